"""Device profiles: what a target phone, board or laptop offers an LLM, as data.

Each shipped profile is one TOML file under ``profiles/`` (its file name is the profile name);
a user passes the path of their own file in the same format. Figures are SI units:
``ram_gb`` and ``app_memory_gb`` in 10**9 bytes, ``memory_bandwidth_gbs`` in 10**9 bytes/s.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from edgeft.errors import EdgeftError
from edgeft.runtimes import RUNTIMES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli is the same parser under its PyPI name.
    try:
        import tomli as tomllib  # type: ignore[no-redef]
    except ModuleNotFoundError:
        tomllib = None  # type: ignore[assignment]  # _parse says what to install

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

Kind = Literal["phone", "sbc", "laptop", "embedded"]


def _nonblank(value: str) -> str:
    if not value.strip():
        raise ValueError(f"must be a non-blank string, got {value!r}")
    return value


def _known_runtimes(names: tuple[str, ...]) -> tuple[str, ...]:
    for name in names:
        if name not in RUNTIMES:
            raise ValueError(
                f"has unknown runtime {name!r}; choose from: {', '.join(sorted(RUNTIMES))}"
            )
    return names


# Each type carries the words an error uses for it (the last string of its metadata).
Text = Annotated[str, Field(strict=True), AfterValidator(_nonblank), "string"]
Count = Annotated[int, Field(strict=True, gt=0), "positive integer"]
Amount = Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False), "positive number"]
Runtimes = Annotated[
    tuple[str, ...],
    Field(min_length=1),
    AfterValidator(_known_runtimes),
    "non-empty list of runtime names",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budgets(_Frozen):
    """Default pass/fail limits for an interactive assistant on the device (None: no limit)."""

    max_rss_mb: Amount | None = None
    min_decode_tok_s: Amount | None = None
    max_ttft_ms: Amount | None = None


class Profile(_Frozen):
    """One device: its hardware figures, usable runtimes and default budgets (a profile file's
    keys are these fields but ``name``, its file name)."""

    name: str
    title: Text
    kind: Annotated[Kind, " | ".join(get_args(Kind))]
    soc: Text
    cpu: Text
    cores: Count
    threads: Count  # threads an LLM decode should use (the big/performance cores)
    ram_gb: Amount
    app_memory_gb: Amount  # what one app may realistically use before the OS kills it
    memory_bandwidth_gbs: Amount  # CPU-achievable, not the datasheet peak
    os: Text
    runtimes: Runtimes
    budgets: Annotated[Budgets, "table"] = Budgets()
    notes: Text | None = None

    @model_validator(mode="after")
    def _fits(self) -> Profile:
        if self.threads > self.cores:
            raise ValueError(f"key 'threads' ({self.threads}) is more than 'cores' ({self.cores})")
        if self.app_memory_gb > self.ram_gb:
            raise ValueError(
                f"key 'app_memory_gb' ({self.app_memory_gb:g}) is more than "
                f"'ram_gb' ({self.ram_gb:g})"
            )
        return self


_SUFFIX = ".toml"
_BUDGET_KEYS = tuple(Budgets.model_fields)


def _expected(loc: tuple) -> str:
    """The words for what the key at ``loc`` takes (its type's last metadata string)."""
    fields = Budgets.model_fields if len(loc) > 1 else Profile.model_fields
    field = fields.get(str(loc[-1]))
    words = [m for m in field.metadata if isinstance(m, str)] if field else []
    return words[-1] if words else "value"


def _message(exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if not loc:  # a check across keys: its message names them
        return error["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"missing key {key!r} ({_expected(loc)}); add it to the file"
    if kind == "extra_forbidden":
        fields = Budgets.model_fields if len(loc) > 1 else Profile.model_fields
        keys = sorted(k for k in fields if k != "name")
        return f"unknown key {key!r}; expected keys: {', '.join(keys)}"
    if kind == "value_error":  # the validators above phrase theirs after the key
        return f"key {key!r} {error['msg'].removeprefix('Value error, ')}"
    return f"key {key!r} must be a {_expected(loc)}, got {error['input']!r}"


def _profile_files() -> dict[str, Traversable]:
    folder = resources.files(__name__) / "profiles"
    return {
        f.name[: -len(_SUFFIX)]: f
        for f in folder.iterdir()
        if f.name.endswith(_SUFFIX) and f.is_file()
    }


def _parse(text: str, name: str, where: str) -> Profile:
    if tomllib is None:
        raise EdgeftError("reading device profiles on Python 3.10 needs: pip install tomli")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise EdgeftError(f"{where}: not valid TOML ({exc})") from None
    if "name" in data:
        raise EdgeftError(f"{where}: unknown key 'name'; a profile's name is its file name")
    try:
        return Profile.model_validate({"name": name, **data})
    except ValidationError as exc:
        raise EdgeftError(f"{where}: {_message(exc)}") from None


def list_profiles() -> list[Profile]:
    """The shipped profiles, sorted by name."""
    files = _profile_files()
    return [
        _parse(files[name].read_text(encoding="utf-8"), name, f"profiles/{name}{_SUFFIX}")
        for name in sorted(files)
    ]


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile file; its name is the file name without ``.toml``.

    Raises:
        EdgeftError: unreadable file, invalid TOML, or a missing/wrong key (named).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeftError(f"{path}: no such device profile file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeftError(f"{path}: cannot read device profile ({exc})") from None
    return _parse(text, path.stem, str(path))


def get_profile(spec: str) -> Profile:
    """A shipped profile by name, or a user profile by the path of its ``.toml`` file.

    Raises:
        EdgeftError: unknown name (the message lists the shipped ones), or a bad file.
    """
    files = _profile_files()
    if spec in files:
        return _parse(files[spec].read_text(encoding="utf-8"), spec, f"profiles/{spec}{_SUFFIX}")
    if spec.endswith(_SUFFIX) or os.sep in spec or "/" in spec or Path(spec).is_file():
        return load_profile(spec)
    raise EdgeftError(
        f"unknown device {spec!r}; choose from: {', '.join(sorted(files))} or pass a .toml file"
    )


def _g(value: float) -> str:
    return f"{value:g}"


def render_list(profiles: list[Profile] | None = None) -> str:
    """One aligned line per profile: name, title, RAM, bandwidth, runtimes."""
    profiles = list_profiles() if profiles is None else profiles
    rows = [
        (
            p.name,
            p.title,
            f"{_g(p.ram_gb)} GB RAM",
            f"{_g(p.memory_bandwidth_gbs)} GB/s",
            ", ".join(p.runtimes),
        )
        for p in profiles
    ]
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(
            [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].rjust(widths[2])]
            + [row[3].rjust(widths[3]), row[4]]
        )
        for row in rows
    )


def render_profile(profile: Profile) -> str:
    """Every field and budget of ``profile``, one per line."""
    p = profile
    budgets = p.budgets
    lines = [
        ("kind", p.kind),
        ("soc", p.soc),
        ("cpu", p.cpu),
        ("cores", f"{p.cores} ({p.threads} used for decode)"),
        ("ram", f"{_g(p.ram_gb)} GB ({_g(p.app_memory_gb)} GB usable by one app)"),
        ("bandwidth", f"{_g(p.memory_bandwidth_gbs)} GB/s (CPU-achievable)"),
        ("os", p.os),
        ("runtimes", ", ".join(p.runtimes)),
        ("budgets", ""),
    ]
    for key, unit in zip(_BUDGET_KEYS, ("MB", "tok/s", "ms"), strict=True):
        value = getattr(budgets, key)
        lines.append((f"  {key}", "none" if value is None else f"{_g(value)} {unit}"))
    if p.notes:
        lines.append(("notes", p.notes))
    width = max(len(k) for k, _ in lines)
    return "\n".join(
        [f"{p.name}: {p.title}"] + [f"  {k.ljust(width)}  {v}".rstrip() for k, v in lines]
    )

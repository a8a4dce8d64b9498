"""Exporters: a merged checkpoint to the files edge runtimes load, one sub-package per format.

Each format's module is imported only when used, so a missing optional dependency matters only
to the format that needs it.
"""


def parse_types(spec, choices, what: str) -> list[str]:
    """``"f16,q8_0"`` → ``["f16", "q8_0"]`` in the given order, checked against ``choices``
    and de-duplicated.

    Raises:
        EdgeftError: an unknown name (the message lists ``choices``), or none at all.
    """
    from edgeft.errors import EdgeftError

    names = spec.split(",") if isinstance(spec, str) else list(spec)
    types: list[str] = []
    for name in (n.strip().lower() for n in names):
        if not name:
            continue
        if name not in choices:
            raise EdgeftError(f"unknown {what} type {name!r}; choose from {', '.join(choices)}")
        if name not in types:
            types.append(name)
    if not types:
        raise EdgeftError(f"no {what} type given; choose from {', '.join(choices)}")
    return types

"""edgeft: fine-tune small language models with QLoRA, merge them correctly, and ship them to
edge runtimes.

Stages are plain functions: :func:`edgeft.train.train`, :func:`edgeft.merge.merge`,
:func:`edgeft.demo.demo`. Heavy dependencies load only when a stage runs.
"""

__version__ = "0.1.0"

"""The command layer: the ``sr-finetune`` CLI (``cli``), the stage registry that the CLI, ``run``,
``demo`` and ``recipes/`` read (``stages``), the experiment's config tree (``experiment``), the
demo (``demo``, ``demo_config``, ``demo_summary``) and the demo world's commands (``world``,
``tiny_world``).

The top floor: the one place that imports the core (``sr_finetune``), ``reward`` and ``eval``
together; nothing below imports it. Stages are imported lazily, when they run.
"""

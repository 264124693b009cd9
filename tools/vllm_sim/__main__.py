"""Entry point for ``python -m tools.vllm_sim``."""

from .cli import main

raise SystemExit(main())

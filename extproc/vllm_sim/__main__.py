"""Entry point for ``python -m extproc.vllm_sim``."""

from .cli import main

raise SystemExit(main())

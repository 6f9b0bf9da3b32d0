"""``python -m med3d_hub.finetune seg|cls ...`` (also under torchrun)."""

from ..cli.finetune import main

raise SystemExit(main())

"""``python -m worker.mlx_lm [mlx_lm.lora's options]``: an mlx-lm fine-tune, supervised through the Session SDK.

Exit status: 0 when trained to the end; 2 on a bad option, an mlx-lm outside the tested range, or a model or data
set mlx-lm cannot load; 75 after a checkpoint-and-exit asked for by the daemon.
"""

from __future__ import annotations

import os
import sys

from worker.mlx_lm.options import PROG, OptionError, parse
from worker.mlx_lm.requirement import MlxLmUnavailable, require


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(sys.argv[1:] if argv is None else argv)
        require()
    except (OptionError, MlxLmUnavailable) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.checkpoint_dir and not os.environ.get("MLXSUP_CHECKPOINT_DIR"):
        os.environ["MLXSUP_CHECKPOINT_DIR"] = args.checkpoint_dir
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as mlx_lm.lora sets it
    # Imported here so that --help, option errors and version errors do not pay for importing mlx-lm.
    from worker.mlx_lm.run import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())

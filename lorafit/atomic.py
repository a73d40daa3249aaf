"""Writing a folder atomically: a crash never leaves a half-written folder where a complete one is expected.

Used for adapters (`lorafit.adapters.peft_io`) and merged models (`lorafit.merge`). Imports nothing of lorafit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_dir_atomically(out_dir: Path, write) -> Path:
    """Call `write(tmp)` on a fresh folder beside `out_dir`, then put it in `out_dir`'s place.

    The old folder (if any) is moved aside, the new one renamed in, and only then the old one deleted; on any
    failure the temporary folder is removed and the old folder is left (or put back) where it was.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = None
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{tmp.name.rpartition('-')[2]}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)  # same parent, so a rename: atomic on POSIX
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old, out_dir)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir

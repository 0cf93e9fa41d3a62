"""No Gradio event may name a file that was not uploaded through Gradio (or is an example picture).

Gradio copies every file object found in an event's inputs into its cache before the handler runs, and
the check that the file was uploaded (`processing_utils._check_allowed`) is skipped when the Blocks are
mounted with `gr.mount_gradio_app` (`has_launched` stays False). A ~200-byte request naming `/dev/zero`
would then copy forever, and any readable picture could be copied into the cache and served back. So
every block of the page refuses such a file itself, before anything is read: only regular files inside
Gradio's upload folder or among the example pictures pass; URLs and every other path are refused with a
readable gr.Error.
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import gradio as gr
from gradio import utils as gradio_utils

REFUSED = (
    "This request names a file on the server that was not uploaded here. "
    "Upload the picture itself (or pick an example) instead."
)


def allowed_file(path: str | Path, folders: Iterable[str | Path]) -> bool:
    """A regular file whose real path (links resolved) lies inside one of `folders`."""
    text = str(path)
    if "://" in text or text.startswith("data:"):
        return False
    try:
        real = os.path.realpath(text)
        if not stat.S_ISREG(os.stat(real).st_mode):
            return False
    except (OSError, ValueError):
        return False
    for folder in folders:
        root = os.path.realpath(str(folder))
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def guard_file_inputs(demo: gr.Blocks, extra_folders: Iterable[str | Path] = ()) -> None:
    """Make every block of `demo` refuse files outside Gradio's upload folder and `extra_folders`."""
    folders = [gradio_utils.get_upload_folder(), *extra_folders]

    def check(path) -> None:
        if path is not None and not allowed_file(path, folders):
            raise gr.Error(REFUSED, title="File refused")

    for block in demo.blocks.values():
        move_async = block.async_move_resource_to_block_cache
        move_sync = block.move_resource_to_block_cache

        @functools.wraps(move_async)
        async def guarded_async(path, _move=move_async):
            check(path)
            return await _move(path)

        @functools.wraps(move_sync)
        def guarded_sync(path, _move=move_sync):
            check(path)
            return _move(path)

        block.async_move_resource_to_block_cache = guarded_async
        block.move_resource_to_block_cache = guarded_sync

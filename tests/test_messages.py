"""Messages that tell the truth (issue 31 item 5): reading local files prints no download bar."""
from __future__ import annotations

import datasets

from train.data.config import DataConfig
from train.data.corpus import load_files


def test_local_files_print_no_download_bar_and_leave_the_bars_as_they_were(tmp_path, capfd):
    (tmp_path / "a.txt").write_text("one document\n\nanother one\n")
    ds = load_files([str(tmp_path / "a.txt")], "text", DataConfig(cache_dir=str(tmp_path / "cache")), "train_files")
    out, err = capfd.readouterr()
    assert len(ds) >= 1
    assert "Downloading" not in out + err and "Generating" not in out + err, out + err
    assert datasets.utils.logging.is_progress_bar_enabled()  # a user's own datasets calls keep their bars

"""bench/to_readme.py: the README quotes bench outputs without log noise, between its markers only."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location("to_readme", ROOT / "bench/to_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_log_lines_are_dropped_and_tables_kept():
    text = ("[step 6] failure: lost worker(s) [3]\r 50%|#####     | 3/6 [00:01<00:01, 2.00it/s]\n"
            "\x1b[33m(raylet)\x1b[0m A worker died\n┃ model ┃ MTTR s ┃\n│ 25m   │   2.12 │\nkill during step 6\n")
    assert load().cleaned(text) == "┃ model ┃ MTTR s ┃\n│ 25m   │   2.12 │\nkill during step 6"


def test_only_the_marked_part_of_the_readme_changes(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/reshard.txt").write_text("[step 1] noise\n│ dp=4 -> fsdp=4 │ 0.81 │\n")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n## after\n")
    subprocess.run([sys.executable, str(ROOT / "bench/to_readme.py"), "--readme", str(readme), "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    text = readme.read_text()
    assert text.startswith("# title\n<!-- bench:start -->") and text.endswith("<!-- bench:end -->\n## after\n")
    assert "│ dp=4 -> fsdp=4 │ 0.81 │" in text and "old table" not in text and "[step 1]" not in text

    readme.write_text("# no markers\n")
    failed = subprocess.run([sys.executable, str(ROOT / "bench/to_readme.py"), "--readme", str(readme), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert failed.returncode != 0 and "no <!-- bench:start -->" in failed.stderr


def test_a_section_without_a_new_output_keeps_its_text_and_a_new_one_carries_its_stamp(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/reshard.txt").write_text("│ dp=4 -> fsdp=4 │ 0.81 │\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\nMeasured on a box; outputs of 2026-12-01 (old).\n\n"
                      "### Recovery from a SIGKILL\n\n│ 25m │ 2.12 │\n<!-- bench:end -->\n")
    subprocess.run([sys.executable, str(ROOT / "bench/to_readme.py"), "--readme", str(readme), "--out",
                    str(tmp_path / "out")], check=True, capture_output=True)
    text = readme.read_text()
    assert "### Recovery from a SIGKILL\n\nMeasured 2026-12-01 or earlier" in text and "│ 25m │ 2.12 │" in text
    assert "### Live reshard against a fair checkpoint-restart\n\nMeasured 20" in text
    assert "; copied here at commit " in text


def test_running_it_again_does_not_repeat_the_trailer(tmp_path):
    """A kept section ends at its table: the block's closing paragraphs were once kept with the last section and
    written again after it, one more copy per run (the README had four)."""
    (tmp_path / "out").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n### Recovery from a SIGKILL\n\nMeasured 2026-12-01.\n\n```text\n"
                      "│ 25m │ 2.12 │\n```\n<!-- bench:end -->\n")
    for _ in range(3):
        subprocess.run([sys.executable, str(ROOT / "bench/to_readme.py"), "--readme", str(readme), "--out",
                        str(tmp_path / "out")], check=True, capture_output=True)
    text = readme.read_text()
    assert text.count("[docs/grpo_noise.md]") == 1 and text.count("[docs/scale.md]") == 1, text
    assert text.count("│ 25m │ 2.12 │") == 1

"""The Python code blocks of the README and the user docs run as written, in order, in a fresh process.

The blocks are read from the Markdown itself, so the pages and this test cannot drift apart. The blocks of one page run
in one fresh Python process (later blocks use what earlier ones made), offline, on a CPU, in a new working directory;
the pages whose blocks read the repository's own files (the data-root lm-eval tasks, the experiment's records) and
write none run from the repository root, as those pages say. A block preceded by an HTML comment
`<!-- not run: <reason> -->` is left out; such blocks must be few and say why.

    pytest tests/test_docs_code_blocks.py -q -m slow -k "inference"     # one page
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
from helpers import REPO_ROOT

PAGES = (
    "README.md",
    "docs/method.md",
    "docs/training.md",
    "docs/inference.md",
    "docs/evaluation.md",
    "docs/measure.md",
)
# Pages whose blocks read files of the repository by relative paths (`benchmarks/tasks`, `benchmarks/multilingual_sft`,
# `../shared/data/benchmarks`) and write nothing there: they run from the repository root.
FROM_REPO_ROOT = frozenset({"docs/evaluation.md", "docs/measure.md"})
MAX_NOT_RUN_PER_PAGE = 2
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>[^>]*?) -->\s*$")

RUNNER = textwrap.dedent(
    """
    import sys, traceback
    blocks = {blocks!r}
    scope = {{"__name__": "__main__"}}
    for index, (line, source) in enumerate(blocks, start=1):
        print(f"--- block {{index}} of {{len(blocks)}} ({page}, line {{line}})", flush=True)
        try:
            exec(compile(source, f"{page}:block{{index}}", "exec"), scope)
        except BaseException:
            traceback.print_exc()
            sys.exit(f"block {{index}} ({page}, line {{line}}) failed")
    """
)


def python_blocks(page: str) -> list[tuple[int, str, str | None]]:
    """`(line, source, reason)` of every fenced Python block of `page`; `reason` is why it is not run, or None."""
    text = (REPO_ROOT / page).read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        not_run = NOT_RUN.search(before)
        blocks.append((line, match.group(1), not_run.group("reason").strip() if not_run else None))
    return blocks


@pytest.mark.parametrize("page", PAGES)
def test_blocks_left_out_are_few_and_say_why(page):
    blocks = python_blocks(page)
    left_out = [(line, reason) for line, _, reason in blocks if reason is not None]
    assert len(blocks) > len(left_out), f"{page}: no block runs"
    assert len(left_out) <= MAX_NOT_RUN_PER_PAGE, f"{page}: too many blocks left out: {left_out}"
    for line, reason in left_out:
        assert len(reason) >= 10, f"{page}, line {line}: say why the block is not run"
    text = (REPO_ROOT / page).read_text(encoding="utf-8")
    marked = len(re.findall(r"^<!-- not run:", text, flags=re.MULTILINE))
    assert marked == len(left_out), f"{page}: a `<!-- not run: ... -->` comment that is not right before a block"


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.usefixtures("smollm2_id")  # the pages load SmolLM2-135M-Instruct by its Hub id, from the Hub cache
def test_page_runs_as_written(page, tmp_path):
    """Every block of the page that is not marked `not run`, in order, in one fresh process, exits cleanly."""
    blocks = [(line, source) for line, source, reason in python_blocks(page) if reason is None]
    script = tmp_path / "blocks.py"
    script.write_text(RUNNER.format(blocks=blocks, page=page), encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    # One torch thread: on a CI machine whose cores are busy, token-by-token generation with several threads waiting
    # on each other was measured 10-40 times slower (2.5 s against 28-111 s for 20 new tokens).
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    work_dir = REPO_ROOT if page in FROM_REPO_ROOT else tmp_path / "work"
    work_dir.mkdir(exist_ok=True)
    finished = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=840, env=env, cwd=work_dir
    )
    assert finished.returncode == 0, f"{finished.stdout[-6000:]}\n{finished.stderr[-6000:]}"
    assert finished.stdout.count("--- block ") == len(blocks)

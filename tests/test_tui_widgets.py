"""Unit tests of the panels' pure parts: block map cells, owner colours, step bars, text helpers,
sampling parameters. No app, no engine: these run in milliseconds."""

from __future__ import annotations

import pytest

from panels.client import BLOCK_CACHED, BLOCK_FREE, ChatParams
from panels.conversation import title_from
from panels.format import clean_text, code_blocks, human_bytes, short_model_name, stats_line
from panels.widgets.block_map import (
    GLYPH_CACHED,
    GLYPH_FREE,
    GLYPH_OWNED,
    GLYPH_SHARED,
    BlockMap,
    BlockMapData,
    OwnerColors,
)
from panels.widgets.history import spark
from panels.widgets.step_bars import StepBars, StepColumn


def test_owner_colors_stay_put_while_a_request_runs() -> None:
    colors = OwnerColors()
    colors.update(["a", "b", "c"])
    b, c = colors.color("b"), colors.color("c")
    colors.update(["b", "c"])  # a finished: b and c keep their colours
    assert (colors.color("b"), colors.color("c")) == (b, c)
    colors.update(["b", "c", "d"])  # d takes the free slot
    assert colors.color("d") not in (b, c)


def _cells(data: BlockMapData, width: int, max_rows: int = 8) -> list[str]:
    block_map = BlockMap(OwnerColors(), max_rows=max_rows)
    block_map.data = data
    glyphs = []
    group = block_map.group_size(width)
    for start in range(0, len(data.block_map), group):
        glyphs.append(block_map._cell(data.block_map[start : start + group], start)[0])
    return glyphs


def test_block_map_cells_owned_shared_cached_free() -> None:
    data = BlockMapData(
        block_map=(0, 0, 1, BLOCK_CACHED, BLOCK_FREE),
        owners=("a", "b"),
        shared=frozenset({1}),
    )
    assert _cells(data, width=10) == [
        GLYPH_OWNED,
        GLYPH_SHARED,
        GLYPH_OWNED,
        GLYPH_CACHED,
        GLYPH_FREE,
    ]


def test_block_map_groups_blocks_when_there_are_many() -> None:
    data = BlockMapData(block_map=(0,) * 10 + (BLOCK_FREE,) * 90, owners=("a",), shared=frozenset())
    cells = _cells(data, width=10, max_rows=2)  # 20 cells for 100 blocks: 5 blocks a cell
    assert len(cells) == 20 and cells[:2] == [GLYPH_OWNED] * 2 and set(cells[2:]) == {GLYPH_FREE}


def test_step_bars_stack_prefill_under_decode() -> None:
    top = 8
    prefill_only = StepColumn(prefill_tokens=8, decode_tokens=0)
    decode_only = StepColumn(prefill_tokens=0, decode_tokens=1)
    assert StepBars._cell(prefill_only, level=2, rows=2, top=top)[0] == "█"
    assert StepBars._cell(decode_only, level=1, rows=2, top=top)[0] != " "  # 1 token still shows
    assert StepBars._cell(decode_only, level=2, rows=2, top=top)[0] == " "


def test_spark_is_right_aligned_and_scaled() -> None:
    assert spark([0, 50, 100], 5, top=100) == "   ▄█"
    assert spark([], 3) == "   "


def test_text_helpers() -> None:
    assert clean_text("a\x1bb\nc\td") == "a\ufffdb\nc\td"
    text = "x\n```python\nprint(1)\n```\ny\n~~~\nls\n~~~\n"
    assert code_blocks(text) == ["print(1)", "ls"]
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(3 * 2**30) == "3.0 GiB"
    assert short_model_name("/tmp/x/llama3-seed0") == "llama3-seed0"
    assert short_model_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    line = stats_line(
        {"tokens": 9, "ttft_s": 0.05, "tokens_per_s": 30.0, "prompt_tokens": 12, "cached_tokens": 8}
    )
    assert line == "9 tok · TTFT 50 ms · 30.0 tok/s · prompt 12 (8 cached)"
    assert title_from("\n  first line\nsecond") == "first line"


def test_chat_params_validate_and_describe() -> None:
    assert ChatParams(temperature=0).describe() == "greedy · max 512"
    assert "seed 3" in ChatParams(seed=3).describe()
    assert ChatParams.from_dict({"top_k": 5, "unknown": 1}).top_k == 5
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}):
        with pytest.raises(ValueError):
            ChatParams(**bad)

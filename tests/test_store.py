"""The SQLite store: schema versioning, refusal of foreign files, streaming, branches, search."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlite_utils import Database

import store.db
from store import (
    MIGRATIONS,
    NotFoundError,
    Store,
    StoreError,
    default_data_dir,
    default_db_path,
    open_store,
)
from store.schema import APPLICATION_ID

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "workbench.db"


@pytest.fixture
def st(db_path: Path) -> Iterator[Store]:
    s = open_store(db_path)
    yield s
    s.close()


def raw(path: Path) -> sqlite3.Connection:
    """A second, independent connection, as another process would have."""
    return sqlite3.connect(path)


def pragma(path: Path, name: str) -> int | str:
    conn = raw(path)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def chat(st: Store, title: str = "chat") -> int:
    return st.create_session(
        title, "tiny", {"block_size": 16, "dtype": "float32"}, {"temperature": 0.7}, "Be brief."
    )


# -- opening, versions, refusing files --------------------------------------------------------


def test_fresh_database_is_migrated_wal_and_stamped(db_path: Path) -> None:
    with open_store(db_path) as st:  # the parent directory does not exist yet
        assert st.schema_version == len(MIGRATIONS)
        assert st.db.journal_mode == "wal"
        assert st.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert st.path == db_path
    assert pragma(db_path, "user_version") == len(MIGRATIONS)
    assert pragma(db_path, "application_id") == APPLICATION_ID
    assert pragma(db_path, "journal_mode") == "wal"


def test_reopen_is_idempotent(db_path: Path) -> None:
    with open_store(db_path) as st:
        sid = chat(st)
        st.add_message(sid, "user", "hello")
        schema = st.db.schema
    for _ in range(2):
        with open_store(db_path) as st:
            assert st.schema_version == len(MIGRATIONS)
            assert st.db.schema == schema
            assert [m.content for m in st.messages(sid)] == ["hello"]


def test_new_migration_applies_in_order_then_is_skipped(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(db_path) as st:
        sid = chat(st)
    calls: list[int] = []

    def v2(db: Database) -> None:
        calls.append(db.execute("PRAGMA user_version").fetchone()[0])
        db.table("sessions").add_column("pinned", int)

    monkeypatch.setattr(store.db, "MIGRATIONS", [*MIGRATIONS, v2])
    with open_store(db_path) as st:
        assert st.schema_version == len(MIGRATIONS) + 1
        assert "pinned" in st.table("sessions").columns_dict
        assert st.get_session(sid).title == "chat"
    with open_store(db_path) as st:
        assert st.schema_version == len(MIGRATIONS) + 1
    assert calls == [len(MIGRATIONS)]  # ran once, at the version before it


def test_failed_migration_rolls_back_and_keeps_version(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(db_path) as st:
        chat(st)

    def broken(db: Database) -> None:
        db.table("half_done").create({"id": int}, pk="id")
        raise RuntimeError("boom")

    monkeypatch.setattr(store.db, "MIGRATIONS", [*MIGRATIONS, broken])
    with pytest.raises(
        StoreError, match=rf"migration to schema version {len(MIGRATIONS) + 1} failed \(boom\)"
    ):
        open_store(db_path)
    assert pragma(db_path, "user_version") == len(MIGRATIONS)
    conn = raw(db_path)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert "half_done" not in names and "sessions" in names
    conn.close()


def test_newer_database_is_refused_and_untouched(db_path: Path) -> None:
    with open_store(db_path) as st:
        chat(st)
    conn = raw(db_path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError) as err:
        open_store(db_path)
    assert str(err.value) == (
        f"{db_path} was written by a newer Workbench (schema version 7, this one knows "
        f"{len(MIGRATIONS)}): upgrade Workbench"
    )
    assert db_path.read_bytes() == before
    assert pragma(db_path, "user_version") == 7


@pytest.mark.parametrize(
    "content",
    [
        b"this is not a database\n" * 200,
        b"SQLite format 3\x00" + bytes(random.Random(0).randrange(256) for _ in range(4080)),
    ],
    ids=["text", "bad-header"],
)
def test_garbage_file_is_refused_and_untouched(db_path: Path, content: bytes) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(StoreError, match=r"is not a Workbench database \(.+\)$") as err:
        open_store(db_path)
    assert "\n" not in str(err.value)
    assert db_path.read_bytes() == content
    assert sorted(p.name for p in db_path.parent.iterdir()) == [db_path.name]


def test_text_file_error_message(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"hello\n" * 200)
    with pytest.raises(StoreError) as err:
        open_store(db_path)
    assert str(err.value) == f"{db_path} is not a Workbench database (file is not a database)"


@pytest.mark.parametrize("user_version", [0, 1])
def test_other_programs_sqlite_file_is_refused_and_untouched(
    db_path: Path, user_version: int
) -> None:
    db_path.parent.mkdir(parents=True)
    conn = raw(db_path)
    conn.execute("CREATE TABLE notes (body TEXT)")
    conn.execute(f"PRAGMA user_version = {user_version}")
    conn.commit()
    conn.close()
    before = db_path.read_bytes()
    with pytest.raises(StoreError, match="is not a Workbench database"):
        open_store(db_path)
    assert db_path.read_bytes() == before


def test_empty_file_becomes_a_store(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    with open_store(db_path) as st:
        assert st.schema_version == len(MIGRATIONS)


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "wb"))
    assert default_db_path() == tmp_path / "wb" / "workbench.db"
    monkeypatch.delenv("WORKBENCH_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "workbench"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "workbench"
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "wb"))
    with open_store() as st:
        assert st.path == tmp_path / "wb" / "workbench.db"
    assert (tmp_path / "wb" / "workbench.db").exists()


def test_memory_store() -> None:
    with open_store(":memory:") as st:
        assert st.path is None
        assert st.get_session(chat(st)).model == "tiny"


# -- sessions and messages --------------------------------------------------------------------


def test_session_round_trip_and_iso_utc_timestamps(st: Store) -> None:
    sid = chat(st, "first")
    s = st.get_session(sid)
    assert (s.title, s.model, s.system_prompt) == ("first", "tiny", "Be brief.")
    assert s.engine_config == {"block_size": 16, "dtype": "float32"}
    assert s.sampling == {"temperature": 0.7}
    created = datetime.fromisoformat(s.created_at)
    assert created.utcoffset() == timedelta(0)
    with pytest.raises(NotFoundError, match="no session 999"):
        st.get_session(999)


def test_streaming_reply_is_visible_to_another_connection(st: Store, db_path: Path) -> None:
    sid = chat(st)
    user = st.add_message(sid, "user", "Tell me a story")
    reply = st.add_message(sid, "assistant", "", parent_id=user, status="streaming")
    other = raw(db_path)
    text = ""
    for word in ["Once", " upon", " a", " time"]:
        text += word
        st.update_message(reply, content=text)
        row = other.execute("SELECT content, status FROM messages WHERE id = ?", [reply]).fetchone()
        assert row == (text, "streaming")
    st.update_message(reply, status="complete", stats={"completion_tokens": 4, "tok_s": 12.5})
    row = other.execute("SELECT content, status, stats FROM messages WHERE id = ?", [reply])
    content, status, stats = row.fetchone()
    assert (content, status, json.loads(stats)) == (
        "Once upon a time",
        "complete",
        {"completion_tokens": 4, "tok_s": 12.5},
    )
    other.close()
    with pytest.raises(NotFoundError):
        st.update_message(12345, content="x")
    with pytest.raises(ValueError, match="status must be one of"):
        st.update_message(reply, status="done")  # type: ignore[arg-type]


def test_partial_reply_survives_a_crash(db_path: Path) -> None:
    script = textwrap.dedent(f"""
        import os
        from store import open_store
        st = open_store({str(db_path)!r})
        sid = st.create_session("crash", "tiny", {{}}, {{}}, None)
        u = st.add_message(sid, "user", "go")
        r = st.add_message(sid, "assistant", "", parent_id=u, status="streaming")
        st.update_message(r, content="partial rep")
        st.update_message(r, content="partial reply so far")
        os._exit(1)  # no close, no cleanup: a crash
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, timeout=60)
    assert proc.returncode == 1
    with open_store(db_path) as st:
        (summary,) = st.list_sessions()
        branch = st.messages(summary.id)
        assert [(m.role, m.content, m.status) for m in branch] == [
            ("user", "go", "complete"),
            ("assistant", "partial reply so far", "streaming"),
        ]


def test_editing_a_message_branches(st: Store) -> None:
    sid = chat(st)
    u1 = st.add_message(sid, "user", "What is 2+2?")
    a1 = st.add_message(sid, "assistant", "4", parent_id=u1)
    u2 = st.add_message(sid, "user", "And 3+3?", parent_id=a1)
    a2 = st.add_message(sid, "assistant", "6", parent_id=u2)
    # The user edits their second question: a sibling of u2, same parent.
    u2b = st.add_message(sid, "user", "And 5+5?", parent_id=a1)
    a2b = st.add_message(sid, "assistant", "10", parent_id=u2b)

    assert [m.id for m in st.messages(sid)] == [u1, a1, u2b, a2b]  # the latest leaf
    assert [m.id for m in st.messages(sid, leaf_id=a2)] == [u1, a1, u2, a2]
    assert [m.id for m in st.messages(sid, leaf_id=a1)] == [u1, a1]
    assert [m.id for m in st.siblings(u2)] == [u2, u2b]
    assert st.latest_leaf(sid) == a2b
    assert st.latest_leaf(sid, under=u2) == a2
    assert st.latest_leaf(sid, under=a1) == a2b

    # Regenerating the last reply is a sibling of a2b; editing the first message a new root.
    a2c = st.add_message(sid, "assistant", "ten", parent_id=u2b)
    assert [m.content for m in st.messages(sid)] == ["What is 2+2?", "4", "And 5+5?", "ten"]
    u1b = st.add_message(sid, "user", "What is 1+1?")
    assert [m.id for m in st.messages(sid)] == [u1b]
    assert [m.id for m in st.siblings(u1)] == [u1, u1b]
    assert [m.id for m in st.messages(sid, st.latest_leaf(sid, under=u1))] == [u1, a1, u2b, a2c]
    assert len(st.all_messages(sid)) == 8

    other = chat(st, "other")
    with pytest.raises(ValueError, match=f"belongs to session {sid}"):
        st.add_message(other, "user", "x", parent_id=a1)
    with pytest.raises(NotFoundError):
        st.messages(other, leaf_id=a1)
    assert st.messages(other) == []
    with pytest.raises(NotFoundError):
        st.messages(999)
    with pytest.raises(ValueError, match="role must be one of"):
        st.add_message(sid, "robot", "x")  # type: ignore[arg-type]


def test_branch_shapes_count_one_branch_and_the_leaves(st: Store) -> None:
    sid = chat(st)
    u1 = st.add_message(sid, "user", "What is 2+2?")
    a1 = st.add_message(sid, "assistant", "4", parent_id=u1)
    u2 = st.add_message(sid, "user", "And 3+3?", parent_id=a1)
    st.add_message(sid, "assistant", "6", parent_id=u2)
    st.add_message(sid, "assistant", "Four.", parent_id=u1)  # regenerated: the latest branch
    one = chat(st, "one branch")
    st.add_message(one, "user", "hi")
    empty = chat(st, "empty")
    shapes = st.branch_shapes([sid, one, empty])
    assert shapes == {sid: (2, 2), one: (1, 1)}  # 5 messages, but 2 on the latest branch
    assert st.branch_shapes([one]) == {one: (1, 1)} and st.branch_shapes([]) == {}


def test_list_sessions_newest_activity_first(st: Store) -> None:
    s1 = chat(st, "one")
    s2 = chat(st, "two")
    s3 = chat(st, "three")
    m = st.add_message(s1, "user", "hi")
    st.add_message(s1, "assistant", "hello", parent_id=m)
    listed = st.list_sessions()
    assert [s.id for s in listed] == [s1, s3, s2]
    assert [s.message_count for s in listed] == [2, 0, 0]
    assert listed[0].last_activity >= listed[0].created_at
    assert [s.id for s in st.list_sessions(limit=1, offset=1)] == [s3]
    assert st.count_sessions() == 3


def test_rename_update_sampling_and_delete(st: Store, db_path: Path) -> None:
    sid = chat(st, "old")
    keep = chat(st, "keep")
    m = st.add_message(sid, "user", "doomed words")
    st.add_message(sid, "assistant", "also doomed", parent_id=m)
    st.add_message(keep, "user", "kept words")
    before = st.get_session(sid).updated_at

    st.rename_session(sid, "new title")
    st.update_session_sampling(sid, {"temperature": 0.0, "top_p": 0.9})
    st.update_session_engine(sid, "tiny-int8", {"quant": "int8"})
    s = st.get_session(sid)
    assert (s.title, s.sampling, s.model, s.engine_config) == (
        "new title",
        {"temperature": 0.0, "top_p": 0.9},
        "tiny-int8",
        {"quant": "int8"},
    )
    assert s.updated_at > before
    assert st.search("doomed")[0].session_title == "new title"

    st.delete_session(sid)
    with pytest.raises(NotFoundError):
        st.get_session(sid)
    with pytest.raises(NotFoundError):
        st.delete_session(sid)
    with pytest.raises(NotFoundError):
        st.rename_session(sid, "x")
    assert [s.id for s in st.list_sessions()] == [keep]
    conn = raw(db_path)
    assert conn.execute("SELECT count(*) FROM messages WHERE session_id = ?", [sid]).fetchone() == (
        0,
    )
    conn.close()


# -- search -----------------------------------------------------------------------------------


def test_search_finds_words_with_title_and_snippet(st: Store) -> None:
    sid = chat(st, "Fox facts")
    u = st.add_message(sid, "user", "Does the quick brown fox jump over the lazy dog?")
    st.add_message(sid, "assistant", "Yes, foxes are agile. A brown quick fox too.", parent_id=u)
    other = chat(st, "Cats")
    st.add_message(other, "user", "Cats nap a lot.")

    (hit,) = st.search("lazy")
    assert (hit.message_id, hit.session_id, hit.session_title, hit.role) == (
        u,
        sid,
        "Fox facts",
        "user",
    )
    assert "[lazy]" in hit.snippet
    assert {h.message_id for h in st.search("BROWN fox")} == {u, u + 1}  # terms ANDed, any case
    assert [h.message_id for h in st.search('"quick brown"')] == [u]  # a phrase stays a phrase
    assert [h.session_title for h in st.search("nap")] == ["Cats"]
    assert st.search("nap", session_id=sid) == []
    assert st.search("giraffe") == []
    assert st.search("") == [] and st.search("   ") == []
    assert len(st.search("fox", limit=1)) == 1
    assert st.search("lazy", highlight=("<b>", "</b>"))[0].snippet.count("<b>lazy</b>") == 1


HOSTILE = [
    '"',
    '""',
    '"""',
    "AND(",
    "AND",
    "OR",
    "NOT",
    "NEAR(a b)",
    "(",
    ")",
    "*",
    "fox*",
    "content:fox",
    "x:y",
    "^fox",
    "-fox",
    "+",
    "'",
    "\\",
    "{content}: fox",
    'a"b"c"',
    '"unbalanced phrase',
    "fox AND ( OR NOT",
    "messages_fts",
    "%_",
    "😀 ü",
    '\t"\n^:(" ',  # a newline inside quotes defeats quote_fts(): the fallback quoting runs
    ' ":\n(\na"^^',
]


@pytest.mark.parametrize("query", HOSTILE)
def test_search_is_safe_for_any_user_text(st: Store, query: str) -> None:
    sid = chat(st)
    st.add_message(sid, "user", "the fox and the hound; AND( is text too")
    st.search(query)  # must not raise


def test_search_fuzz_never_raises(st: Store) -> None:
    sid = chat(st)
    st.add_message(sid, "user", "alpha beta gamma AND OR NOT near")
    rng = random.Random(1234)
    alphabet = list("\"()*:^-+{}' \t\n") + ["AND", "OR", "NOT", "NEAR", "alpha", "a", "ü"]
    for _ in range(400):
        st.search("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12))))
    assert [h.role for h in st.search("AND(")] == ["user"]


def test_search_tracks_streamed_edits_and_forgets_deleted_sessions(st: Store) -> None:
    sid = chat(st)
    r = st.add_message(sid, "assistant", "", status="streaming")
    st.update_message(r, content="draft zebra")
    assert [h.message_id for h in st.search("zebra")] == [r]
    st.update_message(r, content="final okapi", status="complete")
    assert st.search("zebra") == []
    assert [h.message_id for h in st.search("okapi")] == [r]
    st.delete_session(sid)
    assert st.search("okapi") == []
    conn = st.db.execute("SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'okapi'")
    assert conn.fetchone() == (0,)


# -- export -----------------------------------------------------------------------------------


def test_export_markdown_is_the_current_branch(st: Store) -> None:
    sid = chat(st, "Arithmetic")
    u = st.add_message(sid, "user", "What is 2+2?")
    st.add_message(sid, "assistant", "It is five.", parent_id=u)
    st.add_message(
        sid, "assistant", "It is 4.", parent_id=u, stats={"completion_tokens": 4, "tok_s": 31.25}
    )
    md = st.export_markdown(sid)
    assert md.startswith("# Arithmetic\n")
    assert "- Model: `tiny`" in md
    assert '- Sampling: `{"temperature": 0.7}`' in md
    assert '"block_size": 16' in md
    assert "## System\n\nBe brief.\n" in md
    assert "## User\n\nWhat is 2+2?\n" in md
    assert "## Assistant\n\nIt is 4.\n" in md
    assert "completion_tokens: 4 · tok_s: 31.25" in md
    assert "five" not in md
    assert md.index("## User") < md.index("## Assistant")
    assert "five" in st.export_markdown(sid, leaf_id=u + 1)


def test_export_markdown_marks_unfinished_replies(st: Store) -> None:
    sid = chat(st)
    st.add_message(sid, "assistant", "half a", status="cancelled")
    assert "*(cancelled)*" in st.export_markdown(sid)


def test_export_json_is_lossless(st: Store) -> None:
    sid = chat(st, "J")
    u = st.add_message(sid, "user", "hi ü")
    a1 = st.add_message(sid, "assistant", "hello", parent_id=u)
    a2 = st.add_message(sid, "assistant", "hey", parent_id=u, stats={"ttft_ms": 12})
    data = json.loads(json.dumps(st.export_json(sid)))
    assert data["format"] == "workbench.session" and data["version"] == 1
    assert data["session"]["title"] == "J"
    assert data["session"]["sampling"] == {"temperature": 0.7}
    assert data["session"]["system_prompt"] == "Be brief."
    assert data["current_leaf_id"] == a2
    assert [(m["id"], m["parent_id"], m["content"]) for m in data["messages"]] == [
        (u, None, "hi ü"),
        (a1, u, "hello"),
        (a2, u, "hey"),
    ]
    assert data["messages"][2]["stats"] == {"ttft_ms": 12}
    with pytest.raises(NotFoundError):
        st.export_json(999)


# -- builds and benchmark runs ----------------------------------------------------------------


def test_builds_round_trip(st: Store) -> None:
    b1 = st.record_build("tiny", "fp8", "fp8_e4m3", "/tmp/out1")
    b2 = st.record_build("llama", "int4_awq", "bf16", Path("/tmp/out2"))  # type: ignore[arg-type]
    st.update_build(
        b1, status="complete", report={"ppl": 7.25, "layers": [1, 2]}, timings={"calib_s": 3.5}
    )
    b = st.get_build(b1)
    assert (b.model, b.recipe, b.kv_dtype, b.out_dir, b.status) == (
        "tiny",
        "fp8",
        "fp8_e4m3",
        "/tmp/out1",
        "complete",
    )
    assert b.report == {"ppl": 7.25, "layers": [1, 2]}
    assert b.timings == {"calib_s": 3.5}
    assert b.updated_at >= b.created_at
    assert datetime.fromisoformat(b.created_at).utcoffset() == timedelta(0)
    assert st.get_build(b2).out_dir == "/tmp/out2"
    assert st.get_build(b2).status == "running" and st.get_build(b2).report == {}
    assert [x.id for x in st.list_builds()] == [b2, b1]
    assert [x.id for x in st.list_builds(model="tiny")] == [b1]
    with pytest.raises(NotFoundError, match="no build 99"):
        st.get_build(99)
    with pytest.raises(ValueError):
        st.record_build("tiny", "fp8", "fp8", "/x", status="ok")  # type: ignore[arg-type]


def test_bench_runs_round_trip(st: Store) -> None:
    r1 = st.record_bench_run("offline", "tiny", {"batch": 8}, {"tok_s": 1234.5})
    r2 = st.record_bench_run("online", "tiny", {"rate": 4.0}, {"ttft_p50_ms": 20.0})
    r3 = st.record_bench_run("offline", "llama", {"batch": 1}, {"tok_s": 99.0})
    run = st.get_bench_run(r1)
    assert (run.kind, run.model, run.config, run.results) == (
        "offline",
        "tiny",
        {"batch": 8},
        {"tok_s": 1234.5},
    )
    assert [r.id for r in st.list_bench_runs()] == [r3, r2, r1]
    assert [r.id for r in st.list_bench_runs(kind="offline")] == [r3, r1]
    assert [r.id for r in st.list_bench_runs(kind="offline", model="tiny")] == [r1]
    assert [r.id for r in st.list_bench_runs(limit=1, offset=1)] == [r2]
    with pytest.raises(ValueError, match="kind must be one of offline, online"):
        st.record_bench_run("batch", "tiny", {}, {})  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="no bench run 99"):
        st.get_bench_run(99)


# -- threads ----------------------------------------------------------------------------------


def test_writes_from_several_threads(st: Store) -> None:
    errors: list[BaseException] = []
    n_sessions = 15

    def writer(tag: str) -> None:
        try:
            for i in range(n_sessions):
                sid = chat(st, f"{tag}-{i}")
                u = st.add_message(sid, "user", f"{tag} question {i}")
                r = st.add_message(sid, "assistant", "", parent_id=u, status="streaming")
                text = ""
                for k in range(5):
                    text += f" {tag}word{k}"
                    st.update_message(r, content=text)
                st.update_message(r, status="complete", stats={"i": i})
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def reader() -> None:
        try:
            for _ in range(30):
                st.list_sessions()
                st.search("word1")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in ("a", "b")]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    sessions = st.list_sessions(limit=100)
    assert len(sessions) == 2 * n_sessions
    assert all(s.message_count == 2 for s in sessions)
    assert len(st.search("aword4")) == n_sessions
    assert len(st.search("bword4")) == n_sessions
    for s in sessions:
        reply = st.messages(s.id)[-1]
        assert reply.status == "complete" and reply.content.endswith("word4")

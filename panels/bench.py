"""The Bench panel: every saved `workbench bench` run (offline and online) with its key numbers,
and the selected run in full. Reads the store in a worker thread; runs are written by the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, NamedTuple

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.widgets import DataTable, Static

from panels.widgets.table_cursor import cursor_row_key
from store import BenchRun, Store, StoreError

HELP = """\
## Bench

Every benchmark run is saved to the store with its configuration and results, and listed here,
newest first:

- `workbench bench ...` runs the engine in this process (**offline**: fixed concurrency, every
  request exactly `--output-len` tokens).
- `workbench bench --url URL ...` loads a running server (**online**: Poisson arrivals and/or a
  concurrency limit, streamed requests, TTFT, TPOT, ITL, E2E and goodput, failed requests).

The table shows requests/s, output tokens/s, p50 TTFT and TPOT (ms), goodput (requests/s that met
every SLO, when SLOs were given) and failed requests; the pane beside it the selected run in full
(mean, p50, p90, p99 of each latency, the command line, the engine or server).

- **↑/↓** select a run, **r** reloads the list (runs from another terminal show up).
"""

LIST_LIMIT = 500
COLUMNS = ("#", "when", "kind", "model", "load", "req/s", "out tok/s", "TTFT p50", "TPOT p50")
ONLINE_COLUMNS = ("goodput", "failed")


def _when(iso: str, fmt: str = "%m-%d %H:%M") -> str:
    try:
        return datetime.fromisoformat(iso).astimezone().strftime(fmt)
    except ValueError:
        return iso


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _short(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1]


def _p50(results: dict[str, Any], key: str) -> Any:
    stats = results.get(key)
    return stats.get("p50") if isinstance(stats, dict) else None


def load_text(run: BenchRun) -> str:
    """The load in a few characters: prompt and output lengths, arrivals, concurrency."""
    bench = run.config.get("bench") or {}
    isl = "file" if bench.get("prompts_file") else bench.get("input_len", "?")
    shape = f"{isl}→{bench.get('output_len', '?')}"
    if run.kind == "online":
        rate = bench.get("request_rate", "inf")
        arrivals = "burst" if rate in ("inf", None) else f"{rate:g}/s"
        limit = bench.get("max_concurrency")
        return f"{shape} {arrivals}" + (f" c{limit}" if limit else "")
    concurrency = run.config.get("concurrency") or bench.get("concurrency")
    return f"{shape} c{concurrency}" if concurrency else f"{shape} all"


def run_row(run: BenchRun) -> tuple[str, ...]:
    res = run.results
    kind = run.kind + (" spec" if run.config.get("speculative") else "")
    online = run.kind == "online"
    return (
        str(run.id),
        _when(run.created_at),
        kind,
        _short(run.model),
        load_text(run),
        _num(res.get("request_throughput")),
        _num(res.get("output_tok_s"), 1),
        _num(_p50(res, "ttft_ms")),
        _num(_p50(res, "tpot_ms")),
        _num(res.get("goodput")) if online else "-",
        str(res.get("failed", "-")) if online else "-",
    )


class RunDetails(NamedTuple):
    """The selected run as three blocks of Textual markup: what ran, the totals, the latencies."""

    head: str
    totals: str
    latencies: str


def run_details(run: BenchRun) -> RunDetails:
    cfg, res = run.config, run.results
    bench = cfg.get("bench") or {}
    online = run.kind == "online"
    kind = run.kind + (" (speculative)" if cfg.get("speculative") else "")
    when = _when(run.created_at, "%Y-%m-%d %H:%M")
    head = [f"[b]Run #{run.id}[/b] · {kind} · {escape(_short(run.model))} · {when}"]
    if cfg.get("command"):
        head.append(f"[$text-muted]{escape(cfg['command'])}[/]")
    head += [""] + _load_lines(cfg, bench, res, online)

    totals = []
    if online:
        totals.append(_pair("successful", f"{res.get('completed', '-')}"))
        failed = res.get("failed", 0)
        totals.append(_pair("failed", f"[$error]{failed}[/]" if failed else "0"))
    else:
        totals.append(_pair("requests", f"{res.get('num_requests', '-')}"))
    totals += [
        _pair("duration", f"{_num(res.get('wall_s'))} s"),
        _pair("requests/s", _num(res.get("request_throughput"))),
        _pair("output tokens/s", _num(res.get("output_tok_s"), 1)),
        _pair("total tokens/s", _num(res.get("total_tok_s"), 1)),
    ]
    if res.get("goodput") is not None:
        slos = res.get("goodput_slo_ms") or {}
        within = ", ".join(f"{k.upper()} ≤ {v:g} ms" for k, v in slos.items())
        totals.append(_pair("goodput", f"[b]{_num(res['goodput'])}[/b] req/s"))
        totals.append(f"  {res.get('good_requests')}/{res.get('completed')} within {within}")
    if not online and res.get("num_steps") is not None:
        totals.append(_pair("engine steps", str(res["num_steps"])))
    totals += _extra_lines(cfg, res)

    latencies = [f"[b]{'ms':<6}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}[/b]"]
    for label, key in (
        ("TTFT", "ttft_ms"),
        ("TPOT", "tpot_ms"),
        ("ITL", "itl_ms"),
        ("E2E", "e2e_ms"),
    ):
        stats = res.get(key)
        if isinstance(stats, dict):
            cells = "".join(f"{_num(stats.get(q)):>9}" for q in ("mean", "p50", "p90", "p99"))
            latencies.append(f"{label:<6}{cells}")
    errors = res.get("errors") or {}
    if errors:
        latencies += ["", "[b]errors[/b]"]
        latencies += [f"{n} × {escape(message)}" for message, n in list(errors.items())[:10]]
    return RunDetails("\n".join(head), "\n".join(totals), "\n".join(latencies))


def _pair(label: str, value: str) -> str:
    return f"{label:<16}{value}"


def _load_lines(
    cfg: dict[str, Any], bench: dict[str, Any], res: dict[str, Any], online: bool
) -> list[str]:
    prompts = (
        f"prompts from {escape(str(bench['prompts_file']))}"
        if bench.get("prompts_file")
        else f"ISL {bench.get('input_len', '?')} (random ids)"
    )
    count = res.get("num_requests", bench.get("num_requests", "?"))
    if online:
        server = cfg.get("server") or {}
        endpoint = "chat/completions" if bench.get("endpoint") == "chat" else "completions"
        rate = bench.get("request_rate", "inf")
        arrivals = "all at once" if rate in ("inf", None) else f"Poisson {rate:g}/s"
        limit = bench.get("max_concurrency") or "unlimited"
        eos = " (ignore EOS)" if bench.get("ignore_eos") else ""
        peak = res.get("peak_concurrency", "?")
        url = escape(str(server.get("url", bench.get("url", "?"))))
        out = [
            f"[b]server[/b]  {url} /v1/{endpoint}",
            f"[b]load[/b]    {count} requests, {prompts}, OSL {bench.get('output_len', '?')}{eos}",
            f"        arrivals {arrivals}, max concurrency {limit} (peak {peak})",
        ]
        engine = server.get("engine")
        if engine:
            out.append(f"[b]engine[/b]  {_engine_text(engine)}")
        return out
    engine = cfg.get("engine") or cfg.get("engine_config") or {}
    concurrency = cfg.get("concurrency") or bench.get("concurrency") or count
    out = [
        f"[b]load[/b]    {count} requests, {prompts}, OSL {bench.get('output_len', '?')}, "
        f"concurrency {concurrency}, warmup {bench.get('warmup', 0)}",
        f"[b]engine[/b]  {_engine_text(engine)}",
    ]
    device = (cfg.get("system") or {}).get("device_name")
    if device:
        out.append(f"        on {escape(str(device))}")
    return out


def _engine_text(engine: dict[str, Any]) -> str:
    text = escape(_short(str(engine.get("model", "?"))))
    if engine.get("device") not in (None, "auto"):
        text += f" on {engine['device']}"
    if engine.get("dtype") not in (None, "auto"):
        text += f" {engine['dtype']}"
    blocks = engine.get("kv_blocks_total") or engine.get("num_kv_blocks")
    if blocks and engine.get("block_size"):
        text += f", {blocks} KV blocks of {engine['block_size']} tokens"
    return text


def _extra_lines(cfg: dict[str, Any], res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    peer = cfg.get("peer")
    if isinstance(peer, dict):
        out += [
            "",
            _pair("HF tokens/s", _num(peer.get("output_tok_s"), 1)),
            _pair("ours / HF", f"[b]{_num(peer.get('ratio'))}x[/b]"),
            _pair("same tokens", f"{peer.get('same_tokens')}/{res.get('num_requests')}"),
        ]
    if cfg.get("speculative"):
        plain = cfg.get("plain") or {}
        rate = (res.get("spec") or {}).get("acceptance_rate")
        out += [
            "",
            _pair("speedup", f"[b]{_num(cfg.get('speedup'))}x[/b]"),
            _pair("plain tokens/s", _num(plain.get("output_tok_s"), 1)),
            _pair("acceptance", f"{_num(100 * rate, 1)}%" if rate is not None else "-"),
        ]
    return out


class BenchPanel(Vertical):
    HELP: ClassVar[str] = HELP
    BINDINGS = [Binding("r", "reload", "Reload", id="bench.reload")]

    def __init__(self, store: Store, **kwargs: str) -> None:
        super().__init__(**kwargs)
        self.store = store
        self.runs: dict[int, BenchRun] = {}

    def compose(self) -> ComposeResult:
        yield Static("", id="bench-info")
        yield DataTable(id="bench-table", cursor_type="row", zebra_stripes=True)
        with VerticalScroll(id="bench-detail"):
            yield Static("", id="bench-detail-head")
            with Horizontal(id="bench-detail-body"):
                yield Static("", id="bench-detail-totals")
                yield Static("", id="bench-detail-latencies")

    def on_mount(self) -> None:
        self.query_one("#bench-detail").border_title = "Run"
        self.table.add_columns(*COLUMNS, *ONLINE_COLUMNS)
        self.reload()

    @property
    def table(self) -> DataTable[str]:
        return self.query_one("#bench-table", DataTable)

    def focus_default(self) -> None:
        self.table.focus()

    def action_reload(self) -> None:
        self.reload()

    @work(thread=True, exclusive=True, group="bench-load", exit_on_error=False)
    def reload(self) -> None:
        try:
            runs = self.store.list_bench_runs(limit=LIST_LIMIT)
        except StoreError as e:
            self.app.call_from_thread(self.notify, str(e), severity="error")
            return
        self.app.call_from_thread(self._show, runs)

    def _show(self, runs: list[BenchRun]) -> None:
        table = self.table
        keep = self.selected_run()
        table.clear()
        self.runs = {run.id: run for run in runs}
        for run in runs:
            table.add_row(*run_row(run), key=str(run.id))
        info = self.query_one("#bench-info", Static)
        if runs:
            online = sum(run.kind == "online" for run in runs)
            info.update(
                f"{len(runs)} runs ({len(runs) - online} offline, {online} online) · "
                "↑/↓ selects · r reloads"
            )
        else:
            info.update(
                "No benchmark runs yet: `workbench bench` (offline) and `workbench bench --url "
                "URL` (online) save every run here."
            )
        if keep is not None and str(keep) in {str(k.value) for k in table.rows}:
            table.move_cursor(row=table.get_row_index(str(keep)))
        self._detail(self.selected_run())

    def selected_run(self) -> int | None:
        key = cursor_row_key(self.table)
        return int(key) if key else None

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self._detail(self.selected_run())

    def _detail(self, run_id: int | None) -> None:
        run = self.runs.get(run_id) if run_id is not None else None
        details = run_details(run) if run is not None else RunDetails("", "", "")
        self.query_one("#bench-detail-head", Static).update(details.head)
        self.query_one("#bench-detail-totals", Static).update(details.totals)
        self.query_one("#bench-detail-latencies", Static).update(details.latencies)
        self.query_one("#bench-detail").display = run is not None

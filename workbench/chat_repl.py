"""`workbench chat`: a streaming chat REPL in the terminal.

It runs on `AsyncLLM`, not on an `LLM` stepped from this thread, because Ctrl-C must be able to
land at any moment: with the engine stepping in its own thread, a SIGINT only cancels the task that
reads the stream here (asyncio.Runner turns the first Ctrl-C into a cancel), and leaving the stream
aborts the request between two engine steps and frees its pages. Stepping the engine from the main
thread instead, a KeyboardInterrupt could cut `EngineCore.step` halfway. It is also the path the
TUI and the server take.

Commands: /exit (or Ctrl-D) quits, /reset clears the history, /stats shows the last reply's TTFT,
tokens and rate and the KV cache, /help lists them. Reads a pipe as well as a terminal, so it can be
scripted and tested: `printf 'hello\\n/stats\\n/exit\\n' | workbench chat`.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from engine.config import EngineConfig, SamplingParams

HELP = """commands:
  /exit     quit (Ctrl-D too)
  /reset    forget the conversation
  /stats    the last reply's TTFT, tokens and tokens/s, and the KV cache
  /help     this list
Ctrl-C while a reply streams stops that reply."""

PROMPT = "> "


@dataclass
class ReplyStats:
    num_tokens: int = 0
    prompt_tokens: int = 0
    ttft_s: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    start_time: float = 0.0
    end_time: float = 0.0
    finish_reason: str | None = None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first over the time after the first: the streaming rate."""
        if self.num_tokens < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        span = self.last_token_time - self.first_token_time
        return (self.num_tokens - 1) / span if span > 0 else None

    def describe(self) -> str:
        ttft = f"{self.ttft_s * 1e3:.1f} ms" if self.ttft_s is not None else "-"
        rate = f"{self.decode_tok_s:.1f} tok/s" if self.decode_tok_s is not None else "- tok/s"
        total = self.end_time - self.start_time
        tokens = f"{self.num_tokens} token{'s' if self.num_tokens != 1 else ''}"
        return (
            f"TTFT {ttft} | {tokens} | {rate} | {total:.2f} s total | "
            f"prompt {self.prompt_tokens} tokens | finish {self.finish_reason}"
        )


class ChatREPL:
    def __init__(
        self,
        llm: Any,  # AsyncLLM
        params: SamplingParams,
        system: str | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.interactive = self.stdin.isatty()
        self.history: list[dict[str, str]] = self._fresh_history()
        self.last: ReplyStats | None = None
        self._partial: list[str] = []  # the reply streamed so far, kept if it is cancelled
        self._reply = ReplyStats()

    @classmethod
    def from_config(
        cls, config: EngineConfig, params: SamplingParams, system: str | None = None
    ) -> ChatREPL:
        from engine.llm import AsyncLLM
        from workbench.options import engine_kwargs

        llm = AsyncLLM(**engine_kwargs(config))
        if not getattr(llm.tokenizer, "chat_template", None):
            llm.shutdown()
            raise ValueError(
                f"model '{config.model}' has no chat template; use 'workbench generate' instead"
            )
        return cls(llm, params, system)

    def _fresh_history(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system else []

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        state = self.llm.state()
        self._info(
            f"workbench chat: {state.model} on {state.device} ({state.dtype}); /help for "
            "commands, Ctrl-C stops a reply, Ctrl-D or /exit quits"
        )
        if self.interactive:
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        try:
            with asyncio.Runner() as runner:
                while True:
                    line = self._read_line()
                    if line is None:
                        return 0
                    text = line.strip()
                    if not text:
                        continue
                    if text.startswith("/"):
                        if not self._command(text):
                            return 0
                        continue
                    self._turn(runner, text)
        finally:
            self.llm.shutdown()

    def _read_line(self) -> str | None:
        """The next line, or None at end of input (Ctrl-D). Ctrl-C at the prompt clears it."""
        while True:
            try:
                if self.interactive and self.stdin is sys.stdin:
                    return input(PROMPT)
                line = self.stdin.readline()
                return line if line else None
            except EOFError:
                self._write("\n")
                return None
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                self._write("\n")

    def _command(self, text: str) -> bool:
        """Run a /command; False means quit."""
        name = text.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history = self._fresh_history()
            self.last = None
            self._write("(history cleared)\n")
        elif name == "/stats":
            self._write(self._stats_text() + "\n")
        elif name == "/help":
            self._write(HELP + "\n")
        else:
            self._write(f"unknown command {name}; /help lists them\n")
        return True

    def _idle_state(self, timeout_s: float = 1.0) -> Any:
        """The engine's state once it has published its idle snapshot: the loop thread publishes
        a beat after the last output, and between turns nothing should be running."""
        deadline = time.monotonic() + timeout_s
        state = self.llm.state()
        while (state.running or state.waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
            state = self.llm.state()
        return state

    def _stats_text(self) -> str:
        state = self._idle_state()
        kv = (
            f"KV cache: {state.kv_blocks_used}/{state.kv_blocks_total} blocks in use, "
            f"{state.kv_blocks_cached_free} cached, {len(state.running)} running"
        )
        if self.last is None:
            return f"no reply yet\n{kv}"
        return f"{self.last.describe()}\n{kv}"

    # --- one turn -----------------------------------------------------------------------------

    def _turn(self, runner: asyncio.Runner, text: str) -> None:
        messages = [*self.history, {"role": "user", "content": text}]
        self._partial = []
        self._reply = ReplyStats(start_time=time.monotonic())
        try:
            runner.run(self._stream(messages))
        except KeyboardInterrupt:
            # The task was cancelled: leaving AsyncLLM.generate aborted the request.
            self._reply.finish_reason = "abort"
            self._write("\n[reply stopped]\n")
        except ValueError as err:  # the engine refused the request; the history is unchanged
            self._write(f"error: {' '.join(str(err).split())}\n")
            if "max_model_len" in str(err):
                self._write("(the conversation is too long: /reset starts over)\n")
            return
        else:
            self._write("\n")
        self._reply.end_time = time.monotonic()
        self.last = self._reply
        # What was shown stays in the history, a stopped reply too.
        self.history = [*messages, {"role": "assistant", "content": "".join(self._partial)}]

    async def _stream(self, messages: list[dict[str, str]]) -> None:
        reply = self._reply
        async for out in self.llm.chat(messages, self.params):
            if out.delta_text:
                self._partial.append(out.delta_text)
                self._write(out.delta_text)
            reply.num_tokens = len(out.token_ids)
            reply.prompt_tokens = len(out.prompt_token_ids)
            if out.metrics is not None:
                reply.ttft_s = out.metrics.ttft
                reply.first_token_time = out.metrics.first_token_time
                reply.last_token_time = out.metrics.last_token_time
            if out.finished:
                reply.finish_reason = out.finish_reason
                if out.error:
                    self._write(f"\n[error: {out.error}]")

    # --- output -------------------------------------------------------------------------------

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def _info(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

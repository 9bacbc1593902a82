"""``medusa-chat``: chat with a model in the terminal, in the manner of ollama's REPL.

    medusa-chat [MODEL.gguf] [--heads FILE] [--system TEXT] [--verbose] [sampling options]
    medusa-chat -p "What colour is the sky?"        # answer once and exit
    medusa-chat MODEL.gguf "What colour is the sky?" # the same, as ollama's run MODEL PROMPT
    echo "What colour is the sky?" | medusa-chat    # stdin that is not a terminal: the prompt

A thin layer over one ``Medusa`` instance: each turn sends the whole conversation to
``create_chat_completion(stream=True)`` (the engine reuses the cached prefix) and prints the deltas
as they come. When the conversation outgrows the context, the oldest messages are dropped (the
system message stays), as ollama does, and a note says so once. Input history is kept in
``$XDG_DATA_HOME/medusa-edge/history``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from medusa_edge.cli.args import add_model_args, add_numerics_args, add_rpc_args, hidden_alias, medusa_from_args, rpc_kwargs

HELP = '''Available Commands:
  /set            Set session variables
  /show info      Show the model, heads, tree, context and parameters
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use """ to begin a multi-line message.'''

SET_HELP = '''Available Commands:
  /set parameter NAME VALUE   Set a parameter
  /set system TEXT            Set the system message
  /set verbose                Show timings and Medusa statistics after each reply
  /set quiet                  Don't show them

Parameters:
  /set parameter temperature <float>     0: greedy
  /set parameter top_k <int>             0: off
  /set parameter top_p <float>
  /set parameter min_p <float>
  /set parameter repeat_penalty <float>
  /set parameter seed <int>
  /set parameter num_predict <int>       most tokens per reply'''

#: /set parameter NAME -> (keyword of create_chat_completion, type)
PARAMETERS = {
    "temperature": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
    "min_p": ("min_p", float), "repeat_penalty": ("repeat_penalty", float), "seed": ("seed", int),
    "num_predict": ("max_tokens", int),
}
_NAMES = {kw: name for name, (kw, _) in PARAMETERS.items()}


def history_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "medusa-edge", "history")


def _dim(text: str, stream) -> str:
    return f"\x1b[2m{text}\x1b[0m" if stream.isatty() else text


class Chat:
    """A conversation with ``llm`` (a ``Medusa``): the messages, the parameters, the commands."""

    def __init__(self, llm, params: Optional[dict] = None, system: Optional[str] = None, verbose: bool = False,
                 out=None, err=None):
        self.llm, self.params, self.system, self.verbose = llm, dict(params or {}), system, verbose
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.messages: list[dict] = []
        self.trim_noted = False  # the note on dropped messages is shown once per session

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    # -- one turn ----------------------------------------------------------------------------------
    def reply(self, text: str) -> int:
        """Answer ``text``, streaming it. 0: answered; 1: failed (a one-line error; the turn is
        dropped, the typed text stays in the history); 130: interrupted by Ctrl-C."""
        from medusa_edge.errors import ContextOverflowError, MedusaError

        self.messages.append({"role": "user", "content": text})
        self._fit_context()
        conversation = self._conversation()
        reply, last, chunks = "", None, None
        try:
            chunks = self.llm.create_chat_completion(conversation, stream=True, **self.params)
            for chunk in chunks:
                piece = chunk["choices"][0]["delta"].get("content") or ""
                shown = piece if reply.strip() else piece.lstrip()  # no leading blank
                reply += piece
                if shown:
                    self.out.write(shown)
                    self.out.flush()
                last = chunk
        except KeyboardInterrupt:
            if chunks is not None:
                chunks.close()
            if reply.strip():
                self.messages.append({"role": "assistant", "content": reply.strip()})
                note = "\n" + _dim("interrupted: the partial reply stays in the conversation (/clear forgets it)", self.out)
            else:
                self.messages.pop()
                note = _dim("interrupted: the message was dropped from the conversation", self.out)
            self.say(note)
            return 130
        except Exception as e:  # a failed turn leaves the REPL and the conversation as they were
            if chunks is not None:
                chunks.close()
            self.messages.pop()
            what = str(e) if isinstance(e, (MedusaError, ValueError)) else f"{type(e).__name__}: {e}"
            if isinstance(e, ContextOverflowError) and self.messages:
                what += " (/clear forgets the conversation)"
            print(("\n" if reply.strip() else "") + f"error: {what}", file=self.err, flush=True)
            return 1
        # as shown: without the leading blank, the next turn's prompt extends the cached tokens
        self.messages.append({"role": "assistant", "content": reply.strip()})
        self.say()
        if self.verbose and last is not None:
            self.timings(last)
        return 0

    def _conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def _fit_context(self) -> None:
        """Drop the oldest messages, a whole exchange at a time (the system message and the new
        message stay), until the prompt leaves a quarter of the context (or num_predict tokens, if
        fewer) for the reply. A new message too long on its own is left to fail as before."""
        from medusa_edge.api import chat_prompt_tokens

        n_ctx = self.llm.n_ctx()
        room = max(1, min(n_ctx // 4, self.params.get("max_tokens") or n_ctx))
        n_tokens = lambda: len(chat_prompt_tokens(self.llm.engine.model, self._conversation(), self.llm.chat_template))
        dropped = 0
        while len(self.messages) > 1 and n_tokens() > n_ctx - room:
            del self.messages[0]
            dropped += 1
            while len(self.messages) > 1 and self.messages[0]["role"] != "user":
                del self.messages[0]
                dropped += 1
        if dropped and not self.trim_noted:
            self.trim_noted = True
            print(_dim(f"note: the conversation outgrew the context of {n_ctx} tokens: the oldest messages are dropped "
                       "from now on" + (" (the system message stays)" if self.system else ""), self.err),
                  file=self.err, flush=True)

    def timings(self, last: dict) -> None:
        s, u = last.get("medusa") or {}, last.get("usage") or {}
        heads = " ".join(f"{a:.2f}" for a in s.get("head_acceptance", [])) or "-"
        lines = [
            f"prompt tokens:    {u.get('prompt_tokens', s.get('prompt_tokens', '?'))}"
            + (f" ({s['prompt_tokens_reused']} reused from the cache)" if s.get("prompt_tokens_reused") else ""),
            f"prompt eval:      {s.get('time_prefill_s', 0.0):.3f} s",
            f"eval tokens:      {u.get('completion_tokens', s.get('generated_tokens', '?'))}",
            f"eval rate:        {s.get('tokens_per_second', 0.0):.2f} tokens/s",
            f"tokens per step:  {s.get('tokens_per_step', 0.0):.2f} ({s.get('steps', 0)} steps)",
            f"acceptance:       {heads} (per head)",
            f"total duration:   {s.get('time_total_s', 0.0):.3f} s",
        ]
        print(_dim("\n".join(lines), self.err), file=self.err, flush=True)

    # -- commands ----------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a /command; False means exit."""
        words = line.split()
        cmd, args = words[0], words[1:]
        if cmd in ("/bye", "/exit"):
            return False
        if cmd in ("/?", "/help"):
            self.say(SET_HELP if args[:1] in (["set"], ["/set"]) else HELP)
        elif cmd == "/clear":
            self.messages.clear()
            self.say("Cleared session context.")
        elif cmd == "/set" and not args:
            self.say(SET_HELP)
        elif cmd == "/set" and args[0] == "parameter":
            self.set_parameter(args[1:])
        elif cmd == "/set" and args[0] == "system":
            text = line.split(None, 2)[2] if len(args) > 1 else ""
            self.system = text or None
            self.say("Set system message." if text else "Cleared system message.")
        elif cmd == "/set" and args[0] in ("verbose", "quiet"):
            self.verbose = args[0] == "verbose"
            self.say(f"Set '{args[0]}' mode.")
        elif cmd == "/show" and args[:1] == ["info"]:
            self.show_info()
        else:
            self.say(f"Unknown command '{' '.join(words[:2]) if cmd in ('/set', '/show') else cmd}'. Type /? for help")
        return True

    def set_parameter(self, args: list) -> None:
        if len(args) != 2 or args[0] not in PARAMETERS:
            self.say(f"Usage: /set parameter NAME VALUE, NAME one of {', '.join(PARAMETERS)}")
            return
        name, value = args
        kw, kind = PARAMETERS[name]
        try:
            self.params[kw] = kind(value)
        except ValueError:
            self.say(f"Couldn't set parameter: '{value}' is not {'an integer' if kind is int else 'a number'}")
            return
        self.say(f"Set parameter '{name}' to '{value}'")

    def show_info(self) -> None:
        engine = self.llm.engine
        heads = getattr(engine, "heads_path", None)
        tree = self.llm.tree
        params = ", ".join(f"{_NAMES[k]} {v}" for k, v in self.params.items()) or "defaults"
        rows = [
            ("model", self.llm.model_path),
            ("heads", heads or "none (plain decoding)"),
            ("tree", f"{tree.n_nodes} nodes, depth {tree.max_depth}"),
            ("context", f"{self.llm.n_ctx()} tokens"),
            ("parameters", params),
            ("system", self.system or "-"),
            ("messages", str(len(self.messages))),
        ]
        self.say("\n".join(f"  {k:<12}{v}" for k, v in rows))

    # -- the loop --------------------------------------------------------------------------------
    def loop(self, read: Callable[[str], str]) -> int:
        """Read messages and commands until /bye or Ctrl-D."""
        while True:
            try:
                line = read(">>> ")
                if line.lstrip().startswith('"""'):
                    line = _multiline(line, read)
            except KeyboardInterrupt:
                self.say("Use Ctrl + d or /bye to exit.")
                continue
            except EOFError:
                return 0
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            self.reply(text)
            self.say()


def _multiline(first: str, read: Callable[[str], str]) -> str:
    """A message between \"\"\" marks: the rest of the first line, then lines until one ends with them."""
    lines, rest = [], first.lstrip()[3:]
    while not rest.rstrip().endswith('"""'):
        lines.append(rest)
        rest = read("... ")
    lines.append(rest.rstrip()[:-3])
    return "\n".join(lines).strip()


def _plain_input(prompt: str) -> str:
    try:
        return input(prompt)
    except (KeyboardInterrupt, EOFError):
        print()  # end the prompt's line, as prompt_toolkit does
        raise


def _reader() -> Callable[[str], str]:
    """prompt_toolkit with a history file where it is installed, else ``input``."""
    try:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application import get_app
        from prompt_toolkit.formatted_text import FormattedText
        from prompt_toolkit.history import FileHistory
    except ImportError:
        return _plain_input
    path = history_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        history = FileHistory(path)
    except OSError:
        history = None
    session = PromptSession(history=history)
    hint = FormattedText([("fg:ansibrightblack", "Send a message (/? for help)")])
    placeholder = lambda: [] if get_app().is_done else hint  # not left on screen after Ctrl-C / Ctrl-D
    return lambda prompt: session.prompt(prompt, placeholder=placeholder if prompt == ">>> " else None)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="medusa-chat", description="Chat with a model in the terminal (Medusa decoding). With -p, or with "
        "stdin that is not a terminal, answer once and exit. Type /? in the chat for its commands.")
    add_model_args(ap)  # MODEL first: the PROMPT positional follows it
    ap.add_argument("message", nargs="?", metavar="PROMPT", help="answer this message and exit (after MODEL, as "
                    "ollama's run MODEL PROMPT; the same as -p)")
    ap.add_argument("-p", "--prompt", help="answer this message and exit (piped stdin is appended)")
    ap.add_argument("--system", help="system message")
    ap.add_argument("--verbose", action="store_true", help="print timings and Medusa statistics after each reply")
    ap.add_argument("--temp", dest="temperature", type=float, help="temperature; 0 = greedy (default 0.2, as create_chat_completion)")
    hidden_alias(ap, "--temperature", "temperature", type=float)
    ap.add_argument("--top-k", type=int)
    ap.add_argument("--top-p", type=float)
    ap.add_argument("--min-p", type=float)
    ap.add_argument("--repeat-penalty", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("-n", "--max-tokens", type=int, help="most tokens per reply (default: until the context is full)")
    add_numerics_args(ap)
    add_rpc_args(ap)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_intermixed_args(argv)  # MODEL [options] PROMPT, as ollama's run
    if args.message is not None:
        if args.prompt is not None:
            ap.error("give the prompt either after MODEL or with -p, not both")
        args.prompt = args.message
    from medusa_edge import MedusaError, TreeError

    params = {k: v for k, v in [("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                                ("min_p", args.min_p), ("repeat_penalty", args.repeat_penalty),
                                ("seed", args.seed), ("max_tokens", args.max_tokens)] if v is not None}
    one_shot = args.prompt is not None or not sys.stdin.isatty()
    if one_shot:
        piped = "" if sys.stdin.isatty() else sys.stdin.read()
        prompt = "\n\n".join(p for p in (args.prompt, piped) if p and p.strip()).strip()
        if not prompt:
            print("medusa-chat: error: the prompt is empty", file=sys.stderr)
            return 2
    try:
        llm = medusa_from_args(args, **rpc_kwargs(args))
        chat = Chat(llm, params, args.system, args.verbose)
        if one_shot:
            return chat.reply(prompt)
        return chat.loop(_reader())
    except (MedusaError, TreeError) as e:
        print(f"medusa-chat: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

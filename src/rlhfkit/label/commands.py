"""What `rlhfkit label ...` does, as functions (the CLI only parses options).

`init` checks everything first (settings, guidelines, every row, media files, the output) and only then
creates the project, in one step: a bad input leaves nothing behind. Sampling candidates with a model
(`--model`) and ordering by a reward model's uncertainty (`--priority`) happen here, before any server
starts; the server itself loads no model.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

from rlhfkit.data.sources import Row
from rlhfkit.errors import DataError
from rlhfkit.label.items import ItemSpec, Settings, load_items, parse_rows
from rlhfkit.label.store import LabelError, Store, check_new_file, describe


def read_guidelines(path: str) -> str:
    if not path:
        return ""
    p = Path(os.path.expanduser(path))
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"--guidelines {path}: cannot read it as UTF-8 text ({exc})") from None


def sample_specs(settings: Settings, model: str, prompts: str, *, samples: int, max_new_tokens: int,
                 temperature: float, seed: int, max_prompts: int) -> list[ItemSpec]:
    """Candidates sampled with rlhfkit's rollout engine: `samples` distinct answers per prompt."""
    from rlhfkit.feedback.pairs import generate_pairs, load_prompts
    from rlhfkit.models.load import ModelConfig, load_causal_lm, load_tokenizer, resolve_device

    if settings.kind == "compare" and samples != 2:
        raise LabelError(f"--samples {samples}: a compare project shows 2 answers (use --kind rank for more)")
    if settings.kind == "rank" and samples < 3:
        raise LabelError(f"--samples {samples}: a rank project needs at least 3 answers per prompt")
    prompt_list = load_prompts(prompts, max_prompts)
    cfg = ModelConfig(name=model)
    cfg.validate()
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(cfg, device=resolve_device("auto"), tokenizer=tokenizer)
    cands = generate_pairs(lm, tokenizer, prompt_list, samples_per_prompt=max(samples, 2),
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    need = {"compare": 2, "rank": 3, "rate": 1}[settings.kind]
    rows = [Row(f"prompt {i + 1}", {"prompt": c.prompt, "responses": c.completions, "model": model})
            for i, c in enumerate(cands) if len(c.completions) >= need]
    dropped = len(cands) - len(rows)
    if dropped:
        print(f"{dropped} prompt(s) left out: fewer than {need} distinct non-empty answers", file=sys.stderr)
    if not rows:
        raise DataError(f"no prompt got {need} distinct answers; raise --temperature or --samples (nothing was created)")
    return parse_rows(rows, settings, prompts)


def prioritize(specs: list[ItemSpec], reward_model: str) -> None:
    """priority = -(smallest score gap between an item's answers) under `reward_model`: the pairs the
    reward model can least tell apart come first. Media candidates cannot be scored (an error)."""
    from rlhfkit.models.heads import load_reward_model, score_texts

    if any("text" not in c for s in specs for c in s.candidates):
        raise LabelError("--priority: media candidates cannot be scored by a reward model")
    model, tokenizer = load_reward_model(reward_model)
    prompts = [s.prompt for s in specs for _ in s.candidates]
    answers = [c["text"] for s in specs for c in s.candidates]
    scores = iter(score_texts(model, tokenizer, prompts, answers, truncation="left"))
    for s in specs:
        mine = sorted(next(scores) for _ in s.candidates)
        gap = min(b - a for a, b in zip(mine, mine[1:])) if len(mine) > 1 else 0.0
        s.priority = -float(gap)
        s.source["reward_gap"] = round(float(gap), 6)


def init_project(target: str, settings: Settings, *, source: str = "", model: str = "", prompts: str = "",
                 samples: int = 2, max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
                 max_prompts: int = 0, priority: str = "") -> Store:
    settings.check()
    if settings.media_dir:
        media = Path(os.path.expanduser(settings.media_dir)).absolute()
        if not media.is_dir():
            raise LabelError(f"--media {settings.media_dir}: no such folder")
        settings.media_dir = str(media)
    if bool(source) == bool(model):
        raise LabelError("give the candidates with --from FILE, or a model and prompts with --model M --prompts P")
    if model and not prompts:
        raise LabelError("--model needs --prompts FILE (the prompts to answer)")
    check_new_file(target)  # before any slow work (sampling)
    if source:
        specs = load_items(source, settings)
    else:
        specs = sample_specs(settings, model, prompts, samples=samples, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, max_prompts=max_prompts)
    if priority:
        prioritize(specs, priority)
    if not any(s.gold is None for s in specs):
        raise DataError("every row is a gold item; a project needs items to label besides the gold ones")
    if settings.gold_rate > 0 and not any(s.gold is not None for s in specs):
        raise LabelError("--gold-rate: no row has a 'gold' answer to mix in")
    return Store.create(target, settings, specs)


def add_items(target: str, source: str, priority: str = "") -> list[int]:
    store = Store.open(target)
    try:
        # row n of the project is `item-n` by default: count the gold rows too, or a new key repeats one
        specs = load_items(source, store.settings, first_index=store.count_items(gold=True) + 1)
        if priority:
            prioritize(specs, priority)
        return store.add_items(specs)
    finally:
        store.close()


def link(base: str, token: str) -> str:
    return f"{base.rstrip('/')}/login?token={token}"


def public_base(store: Store) -> str:
    return str(store.meta_values().get("public_url") or "http://127.0.0.1:8765")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """A clear error now for a port in use, instead of the server's log line after start-up."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE (Linux, macOS)
                raise LabelError(f"--port {port}: already in use on {host} (another server?); choose another "
                                 "--port") from None
            raise LabelError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def serve(target: str, host: str = "127.0.0.1", port: int = 8765, public_url: str = "", quiet: bool = False) -> None:
    """Run the server until Ctrl-C; print the admin link and how to add annotators first."""
    import uvicorn

    from rlhfkit.label.app import create_app

    store = Store.open(target)
    try:
        check_port(host, port)
    except LabelError:
        store.close()
        raise
    shown_host = host if is_loopback(host) or host not in ("0.0.0.0", "::") else socket.gethostname()
    base = public_url or f"http://{'[' + shown_host + ']' if ':' in shown_host else shown_host}:{port}"
    store.set_meta("public_url", base)
    token = store.admin_token()
    s = store.settings
    print(f"rlhfkit label: {describe(target)} ({s.kind}, {store.count_items()} items, overlap {s.overlap})")
    if is_loopback(host):
        print(f"listening on http://{host}:{port} (this machine only; --host 0.0.0.0 to let others reach it)")
    else:
        print(f"WARNING: listening on {host}:{port}, reachable from the network over plain HTTP; tokens travel "
              "unencrypted unless a TLS proxy is in front (docs/label.md, 'Running it for a team')")
    print(f"admin (a new link each start; keep it private):\n  {link(base, token)}")
    print(f"add annotators:  rlhfkit label add-annotator {target} NAME   (prints their personal link)")
    sys.stdout.flush()
    app = create_app(store, public_url=base)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info",
                            access_log=not quiet, server_header=False, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        store.close()


def status_text(status: dict[str, Any]) -> str:
    lines = [f"{status['kind']} project: {status['items_done']}/{status['items']} items done "
             f"(overlap {status['overlap']}, {status['items_started']} started, {status['gold_items']} gold); "
             f"{status['labels']} labels, {status['skips']} skips, {status['retracted']} undone"]
    ag = status["agreement"]
    alpha = "n/a" if ag["alpha"] is None else f"{ag['alpha']:.3f}"
    lines.append(f"agreement: Krippendorff's alpha ({ag['metric']}) {alpha} over {ag['pairable_units']} units")
    for k in ag["kappa"]:
        kappa = "n/a" if k["kappa"] is None else f"{k['kappa']:.3f}"
        lines.append(f"  kappa {k['a']} & {k['b']}: {kappa} ({k['shared']} shared)")
    pb = status["position_bias"]
    if status["kind"] == "compare":
        share = "n/a" if pb["left_share"] is None else f"{100 * pb['left_share']:.1f}%"
        lines.append(f"position bias: left answer chosen in {share} of {pb['decided']} decided comparisons")
    if status.get("audit", {}).get("agree_with_file") is not None:
        au = status["audit"]
        lines.append(f"audit: the file's chosen answer picked in {100 * au['agree_with_file']:.1f}% of {au['decided']} "
                     "decided comparisons")
    lines.append(f"{'annotator':<20} {'labels':>7} {'skips':>6} {'per hour':>9} {'gold acc':>9}")
    for a in status["annotators"]:
        gold = "" if a["gold_accuracy"] is None else f"{100 * a['gold_accuracy']:.0f}% ({a['gold_seen']})"
        lines.append(f"{a['name']:<20} {a['labels']:>7} {a['skips']:>6} {a['per_hour']:>9} {gold:>9}")
    if status["disputed"]:
        lines.append("most disputed: " + ", ".join(f"{d['key']} ({100 * d['share']:.0f}%)" for d in status["disputed"][:5]))
    return "\n".join(lines)

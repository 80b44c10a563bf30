"""Train the embedded demo model that ships in ``minimind_core/demo/``.

    python examples/train_demo_model.py            # about 10 minutes on a 2-core CPU
    python examples/train_demo_model.py --generation minimind2   # tests/data/minimind2-tiny/

``--generation minimind2`` trains the same model on the same corpus in MiniMind2's format (no
q/k norm, its FFN width rule and RMSNorm eps) into ``tests/data/minimind2-tiny/``: a trained
MiniMind2-format test artifact (the quantization quality tests need trained weights of both).

Reproducible: the corpus comes from ``demo_corpus.py`` beside this script (fixed seeds), the tokenizer
and the model are trained with fixed seeds, and torch runs deterministic kernels on one thread
(``--threads``; a different thread count may change the last bits of the result). One thread is
the default because it is the fastest on a small shared machine: a second OpenMP thread that has
to wait for a busy core slows every step several times over. Steps:

1. generate a templated chat corpus (greetings, who-are-you in English and Chinese, additions and
   subtractions of numbers up to 99 in many wordings, answered with column arithmetic worked
   digit by digit, a table of facts);
2. train a byte-level BPE tokenizer (``tokenizers``) with MiniMind's special tokens
   ``<|endoftext|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2 and a ChatML chat template; digits
   are split one by one (as Qwen's tokenizer does) so sums can be learned digit by digit;
3. train a small MiniMind-3 (or MiniMind2) model with this project's own torch model code
   (``backends.torch.model.MiniMindForCausalLM``), loss on the assistant tokens only;
4. write ``model.safetensors`` (upstream key names, fp16, no ``lm_head.weight``: it is tied),
   ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json``, then load the folder back
   with ``minimind_core.load`` and check the held-out arithmetic questions with greedy decoding.

The held-out operand pairs (``corpus.held_out_questions``) never appear in training, in either
order or any wording; greedy decoding must answer at least 90% of them exactly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import demo_corpus as C  # noqa: E402  (beside this script)

from minimind_core.config import MINIMIND2, MINIMIND3  # noqa: E402
from minimind_core.demo import DEMO_DESCRIPTION  # noqa: E402

# where each generation's model goes without --out: the demo, or the MiniMind2 test artifact
DEFAULT_OUT = {MINIMIND3: ROOT / "minimind_core" / "demo",
               MINIMIND2: ROOT / "tests" / "data" / "minimind2-tiny"}
MINIMIND2_DESCRIPTION = (
    "A tiny MiniMind2-format test model (tests/data/minimind2-tiny): the embedded demo's corpus "
    "and settings trained by examples/train_demo_model.py --generation minimind2 --threads 1. "
    "It is a test artifact (trained weights for the quantization quality tests), not a real "
    "MiniMind model.")
# Qwen2's pre-tokenizer pattern: words, single digits, punctuation runs, newlines, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generation", choices=tuple(DEFAULT_OUT), default=MINIMIND3,
                   help="model format: minimind3 (the demo) or minimind2 (a test artifact)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder to write the model to (default: minimind_core/demo for "
                        "minimind3, tests/data/minimind2-tiny for minimind2)")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest on a shared 2-core machine: no OpenMP spinning)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-positions", type=int, default=2048,
                   help="max_position_embeddings written to config.json")
    args = p.parse_args()
    if args.out is None:
        args.out = DEFAULT_OUT[args.generation]
    return args


# -- tokenizer -------------------------------------------------------------------------------

def train_tokenizer(conversations: list[C.Conversation], vocab_size: int):
    """A byte-level BPE over the corpus text with MiniMind's three special tokens first."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(C.SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Each distinct text once: repeats would only re-weight merges towards the arithmetic.
    texts = sorted({m["role"] + "\n" + m["content"] for conv in conversations for m in conv})
    tok.train_from_iterator(texts, trainer)
    for i, special in enumerate(C.SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, f"{special} must have id {i}"
    return tok


def tokenizer_config(max_positions: int) -> dict:
    """tokenizer_config.json in the shape of MiniMind's (ChatML, no default system prompt)."""
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True}
             for i, t in enumerate(C.SPECIAL_TOKENS)}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "legacy": True,
        "model_max_length": max_positions, "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": C.CHAT_TEMPLATE,
    }


# -- data --------------------------------------------------------------------------------------

def encode_conversations(tok, conversations: list[C.Conversation]) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) per conversation; labels are -100 except on assistant replies + <|im_end|>.

    The reply span is found by encoding the prompt up to each reply (what the engine will see at
    inference) and checking that it is a prefix of the full encoding.
    """
    im_end = C.SPECIAL_TOKENS.index("<|im_end|>")
    full_texts, prefix_texts, turn_texts, owners = [], [], [], []
    for n, conv in enumerate(conversations):
        full_texts.append(C.render(conv))
        for i, m in enumerate(conv):
            if m["role"] == "assistant":
                prefix_texts.append(C.render(conv[:i], add_generation_prompt=True))
                turn_texts.append(C.render(conv[:i + 1]))
                owners.append(n)
    enc = lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    full, prefixes, turns = enc(full_texts), enc(prefix_texts), enc(turn_texts)
    labels = [[-100] * len(ids) for ids in full]
    for n, prefix, turn in zip(owners, prefixes, turns, strict=True):
        ids = full[n]
        end = len(turn) - 1  # the reply ends with <|im_end|>; the "\n" after it is not trained
        if ids[:len(prefix)] != prefix or ids[:len(turn)] != turn or ids[end - 1] != im_end:
            raise RuntimeError(f"tokenization is not prefix-stable for {conversations[n]!r}")
        labels[n][len(prefix):end] = ids[len(prefix):end]
    return list(zip(full, labels, strict=True))


def held_out_examples(tok) -> list[tuple[list[int], list[int]]]:
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in C.held_out_questions()]
    return encode_conversations(tok, convs)


def batches(data, batch_size: int, rng: np.random.Generator):
    """Endless padded batches; rows of similar length are grouped to waste little padding."""
    import torch

    while True:
        order = rng.permutation(len(data))
        chunk = batch_size * 32
        groups = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s:s + chunk], key=lambda i: len(data[i][0]))
            groups += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
        for g in rng.permutation(len(groups)):
            yield collate([data[i] for i in groups[g]], torch)


def collate(rows, torch):
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, :len(y)] = torch.tensor(y)
    # position t predicts token t+1
    return ids[:, :-1], labels[:, 1:]


# -- model -------------------------------------------------------------------------------------

def build_model(args, vocab_size: int):
    import torch

    from backends.torch.model import MiniMindForCausalLM
    from minimind_core.config import ModelConfig

    cfg = ModelConfig.for_generation(
        args.generation, args.hidden_size, args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.hidden_size // args.heads,
        vocab_size=vocab_size, max_position_embeddings=args.max_positions)
    model = MiniMindForCausalLM(cfg)
    # GPT-2 style init: small normal weights, residual outputs scaled down by depth.
    for name, p in model.named_parameters():
        if p.ndim == 2:
            std = 0.02 / math.sqrt(2 * cfg.num_hidden_layers) if name.endswith(
                ("o_proj.weight", "down_proj.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
    return model, cfg


def held_out_accuracy(model, examples, batch_size: int = 128) -> float:
    """Greedy exact-match under teacher forcing: every reply token (and <|im_end|>) is the argmax.

    This equals greedy decoding's exact-match, since greedy decoding reproduces the reply iff
    each of its tokens is the argmax given the ones before.
    """
    import torch

    model.eval()
    right = 0
    with torch.no_grad():
        for s in range(0, len(examples), batch_size):
            ids, labels = collate(examples[s:s + batch_size], torch)
            pred = model(ids).argmax(-1)
            ok = ((pred == labels) | (labels == -100)).all(dim=1)
            right += int(ok.sum())
    model.train()
    return right / len(examples)


def train(args, model, data, held_out) -> None:
    import torch
    import torch.nn.functional as F

    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    rng = np.random.default_rng(args.seed)
    stream = batches(data, args.batch_size, rng)
    model.train()
    t0, loss_sum, tokens = time.perf_counter(), 0.0, 0
    for step in range(args.steps):
        ids, labels = next(stream)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_sum += loss.item()
        tokens += ids.numel()
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - t0
            print(f"step {step + 1:5d}/{args.steps}  loss {loss_sum / 100:.4f}  "
                  f"lr {lr_at(step):.2e}  {tokens / elapsed:6.0f} tok/s  {elapsed:6.1f}s",
                  flush=True)
            loss_sum = 0.0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = held_out_accuracy(model, held_out)
            print(f"step {step + 1:5d}  held-out exact (teacher-forced greedy) {acc:.1%}", flush=True)


# -- writing -----------------------------------------------------------------------------------

def write_model(args, model, cfg, tok, out: Path, stats: dict) -> None:
    """Write weights (fp16, upstream names, head tied so omitted), config and tokenizer files."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().numpy().astype(np.float16)
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "model.safetensors").chmod(0o644)
    config = {
        "architectures": ["MiniMindForCausalLM"],
        "model_type": "minimind",
        "generation": cfg.generation,
        "demo": True,
        "description": DEMO_DESCRIPTION if cfg.generation == MINIMIND3 else MINIMIND2_DESCRIPTION,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": True,
        "use_moe": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": "float16",
        "training": stats,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(args.max_positions), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8")


def check_with_engine(out: Path) -> float:
    """Load the written folder with minimind_core.load and ask every held-out question."""
    import minimind_core

    engine = minimind_core.load(out, backend="torch")
    questions = C.held_out_questions()
    right = 0
    wrong = []
    for q, want in questions:
        got = engine.chat([{"role": "user", "content": q}], max_new_tokens=64).text.strip()
        if got == want:
            right += 1
        elif len(wrong) < 5:
            wrong.append((q, want, got))
    for q, want, got in wrong:
        print(f"  wrong: {q!r}: want {want!r}, got {got!r}")
    for q in ("Hello", "Who are you?", "你是谁？", "What is the capital of France?", "谢谢"):
        print(f"  {q!r} -> {engine.chat([{'role': 'user', 'content': q}], max_new_tokens=160).text!r}")
    return right / len(questions)


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    conversations = C.training_conversations()
    tok = train_tokenizer(conversations, args.vocab_size)
    data = encode_conversations(tok, conversations)
    held_out = held_out_examples(tok)
    lengths = [len(ids) for ids, _ in data]
    print(f"corpus: {len(data)} conversations, {sum(lengths)} tokens (max {max(lengths)}), "
          f"held-out questions: {len(held_out)}; tokenizer vocab {tok.get_vocab_size()} "
          f"[{time.perf_counter() - start:.1f}s]", flush=True)

    model, cfg = build_model(args, tok.get_vocab_size())
    print(f"model: {cfg.kind} hidden {cfg.hidden_size} layers {cfg.num_hidden_layers} heads "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} ffn {cfg.intermediate_size} "
          f"params {cfg.num_parameters() / 1e6:.2f}M", flush=True)
    t_train = time.perf_counter()
    train(args, model, data, held_out)
    train_seconds = time.perf_counter() - t_train
    acc_tf = held_out_accuracy(model, held_out)

    stats = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "seed": args.seed, "threads": args.threads, "train_seconds": round(train_seconds),
             "held_out_questions": len(held_out), "held_out_exact": round(acc_tf, 4)}
    write_model(args, model, cfg, tok, args.out, stats)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file()
               and f.suffix in (".json", ".safetensors"))
    acc = check_with_engine(args.out)
    total = time.perf_counter() - start
    print(f"held-out exact match with minimind_core.load + engine.chat (greedy): {acc:.1%} "
          f"of {len(held_out)}", flush=True)
    print(f"wrote {args.out} ({size / 1e6:.2f} MB); training {train_seconds / 60:.1f} min, "
          f"total {total / 60:.1f} min on {args.threads} threads", flush=True)


if __name__ == "__main__":
    main()

"""``lmforge study architectures``: the Transformer's three forms side by side, on the same data.

    lmforge study architectures                      # the default: about 18 minutes on 2 CPU cores
    lmforge study architectures --size d64l2 --flops 2e12 --minutes 5 --out runs/small-architectures

The notes say that decoder-only models (GPT) give the best zero-shot results, that
encoder-decoder models (T5) need multitask fine-tuning to do their best, and that
encoder-only models (BERT) understand rather than generate. This study trains the three
forms at matched size and compute and asks them the same held-out questions:

- **decoder**: ``L`` causal blocks, next-token loss on the whole text;
- **encoder**: ``L`` bidirectional blocks, BERT's masked-token loss (15% of tokens, 80/10/10);
- **encoder-decoder**: ``L/2`` encoder and ``L - L/2`` decoder blocks, T5's span corruption
  (its decoder blocks also cross-attend, so it has about 15% more parameters).

Everything else is shared: width, heads, RoPE, RMSNorm, SwiGLU, the tokenizer, the text and
the seed. Compute is matched by counting it: torch's FLOP counter counts one training step
of each form (eager attention, so attention's products count too), and each form trains for
``flops`` / (its step's FLOPs) steps of ``batch_size`` windows of ``seq_len`` tokens. A
token of an encoder-decoder goes through one of its two stacks, and span corruption hands
the decoder only the hidden spans, so at equal compute it reads about twice as much text.

The text is the built-in corpus (``inputs``, cleaned and deduplicated as ``lmforge data
prepare`` does) with ``task_items`` question/answer lines of the built-in verifiable tasks
mixed in, as web text holds questions next to their answers. The scored questions are held
out of both the pretraining text and the tuning set. Each form answers the way its
objective taught it::

    decoder          Q: Sort these numbers: 58, 16, 96 A:                 ->  " 16, 58, 96" "\\n"
    encoder          [CLS] Q: Sort these numbers: 58, 16, 96 A: [MASK] [MASK] [MASK] \\n [SEP]
    encoder-decoder  Q: Sort these numbers: 58, 16, 96 A: <s0> </s>       ->  <s0> " 16, 58, 96" "\\n"

(span corruption always hides a window's last run, so the encoder-decoder is asked to write
the text after ``A:`` as the hidden run at the end of its input). An answer counts as right
when each of its tokens is the model's likeliest with the gold tokens before it given, and
for the generating forms the likeliest token after it ends it (a line break or the end of
the text; for the encoder-decoder also the next sentinel, which ends a span): exactly what
greedy decoding would write before it stops. The encoder is told how many tokens the answer
has (one mask each) and fills them all in one pass, BERT's way: a help the two others do not
get. Four settings per form:

- **zero-shot**: the question alone; **few-shot**: ``shots`` solved questions of the same
  kind (from the training split) before it;
- **tuned** (zero- and few-shot again): after multitask fine-tuning, ``tune_steps`` steps on
  training questions of every kind in the same format, half of them with solved questions
  before them (as FLAN mixes zero- and few-shot templates), the loss on the answer only (for
  the encoder: on its masked answer tokens, the masked-LM head as a span-prediction head).

Each score is the share of right answers with its binomial standard error, beside the mean
per-token log-likelihood of the gold answer (a continuous reading of the same answers).
Results land in ``out``: ``results.json``, ``results.md`` and ``architectures.png``; an
interrupted study resumes (finished phases are read back, a stopped run continues from its
last checkpoint).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.tasks import TASK_MAKERS, Task, train_eval_tasks
from lmforge.errors import InputError
from lmforge.files import read_json, write_json_atomic
from lmforge.model import ModelConfig, build_model
from lmforge.model.transformer import padding_mask
from lmforge.runtime import Runtime
from lmforge.settings import field, to_dict
from lmforge.study.ladder import HEAD_DIM, check_same_study, parse_size, train_config
from lmforge.tokenizer.special import BEGIN_OF_TEXT, END_OF_TEXT, MASK, PAD, SPECIAL_IDS
from lmforge.train import PretrainStage, fit
from lmforge.train.loop import Stage
from lmforge.train.mlm import MaskedLMStage
from lmforge.train.sft import epoch_rows
from lmforge.train.span import NUM_SENTINELS, SpanCorruptionStage, sentinel_ids

BOS, EOS, MASK_ID, PAD_ID = (SPECIAL_IDS[t] for t in (BEGIN_OF_TEXT, END_OF_TEXT, MASK, PAD))
IGNORE = -100  # target of a position that is not scored
FORMS = ("decoder", "encoder", "encoder-decoder")
SETTINGS = ("zero-shot", "few-shot", "tuned zero-shot", "tuned few-shot")
BLOCK_ITEMS = 8  # question/answer lines per task document of the pretraining text


@dataclass
class ArchitecturesConfig:
    """A study of the three forms: their size, compute, text, questions and tuning."""

    out: str = field("runs/study-architectures", "folder of the study (data, runs, results); rerun to resume")
    forms: list[str] = field(list(FORMS), f"forms to train and compare ({', '.join(FORMS)})")
    size: str = field("d64l4", "dDIM lLAYERS of the decoder and the encoder (heads of 32 dimensions); the "
                      "encoder-decoder splits the layers between its two stacks")
    flops: float = field(1.5e13, "pretraining compute of each form, in FLOPs counted by torch's FLOP counter")
    inputs: list[str] = field(["builtin"], "pretraining text (files, folders, globs, builtin, hf:NAME)")
    max_bytes: int = field(1_500_000, "cap on the prepared corpus in bytes (0: all of it)")
    kinds: list[str] = field(["max", "sort", "count"], "task kinds of the questions (built-in verifiable "
                             "tasks: " + ", ".join(TASK_MAKERS) + ")")
    task_items: int = field(100_000, "training questions with answers: mixed into the pretraining text, and the "
                            "tuning set")
    eval_items: int = field(400, "held-out questions each setting is scored on (round robin over the kinds)")
    shots: int = field(2, "solved questions before each question in the few-shot settings")
    tune_steps: int = field(1000, "steps of multitask fine-tuning (the same for every form)")
    tune_lr: float = field(5e-4, "peak learning rate of the fine-tuning")
    vocab_size: int = field(2048, "BPE vocabulary of the study's tokenizer")
    seq_len: int = field(160, "tokens per training window (and the longest question that can be asked)")
    batch_size: int = field(16, "sequences per step")
    lr: float = field(3e-3, "peak pretraining learning rate (warmup over a tenth of the run, then cosine decay)")
    minutes: float = field(40.0, "the study must fit this many minutes (estimated from timed steps before "
                           "anything trains); finished phases do not count")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto (bf16 where fast), bf16, fp32")
    seed: int = field(1337, "seed for data, weights and batches")
    progress: bool = field(True, "show progress bars")

    def __post_init__(self) -> None:
        if parse_size(self.size)[1] < 2 and "encoder-decoder" in self.forms:
            raise ValueError(f"size {self.size}: an encoder-decoder needs two layers at least (one per stack)")
        unknown = [form for form in self.forms if form not in FORMS]
        if unknown or not self.forms:
            raise ValueError(f"forms {unknown or self.forms}: choose from {', '.join(FORMS)}")
        unknown = [kind for kind in self.kinds if kind not in TASK_MAKERS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds {unknown or self.kinds}: choose from {', '.join(TASK_MAKERS)}")
        if self.flops <= 0:
            raise ValueError("flops must be positive, such as 1.5e13")
        if min(self.task_items, self.eval_items, self.tune_steps) < 1 or self.shots < 0:
            raise ValueError("task_items, eval_items and tune_steps must be at least 1, shots at least 0")


# Fields that change what a phase computes: a folder made with other values cannot be resumed. Those that
# shape the data (tokenizer, text, questions) are fixed from the start, the others once a run has started.
DATA_SETTINGS = ("inputs", "max_bytes", "kinds", "task_items", "eval_items", "vocab_size", "seed")
SAME_STUDY = (*DATA_SETTINGS, "size", "flops", "shots", "tune_steps", "tune_lr", "seq_len", "batch_size", "lr")


# ---- questions as token ids ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Question:
    """A question as token ids: what comes before the answer (solved questions, then ``Q: ... A:``), the
    answer's tokens (``" ANSWER"``), and the line break that ends a line."""

    kind: str
    prefix: list[int]
    answer: list[int]
    newline: list[int]


def line_ids(tokenizer, task: Task) -> tuple[list[int], list[int], list[int]]:
    """(question, answer, line break) of one ``Q: ... A: ...`` line, each piece tokenized on its own, in the
    pretraining text and the questions alike, so an answer always starts and ends on a token boundary."""
    return (tokenizer.encode(f"Q: {task.prompt} A:"), tokenizer.encode(" " + task.answer), tokenizer.encode("\n"))


def make_question(tokenizer, task: Task, shots: list[Task]) -> Question:
    prefix: list[int] = []
    for shot in shots:
        q, a, nl = line_ids(tokenizer, shot)
        prefix += q + a + nl
    q, a, nl = line_ids(tokenizer, task)
    return Question(task.kind, prefix + q, a, nl)


def pick_shots(train: list[Task], tasks: list[Task], shots: int, seed: int) -> list[list[Task]]:
    """``shots`` training questions of each task's kind (never the task itself), drawn from ``seed``."""
    by_kind: dict[str, list[Task]] = {}
    for task in train:
        by_kind.setdefault(task.kind, []).append(task)
    rng = random.Random(f"{seed}:shots")
    return [[t for t in rng.sample(by_kind[task.kind], shots + 1) if t != task][:shots] if shots else []
            for task in tasks]


# ---- the three forms -------------------------------------------------------------------------------------

class Form:
    """How one form is built, pretrained, and asked a question.

    :meth:`rows` lays a question out for the model; :meth:`collate` pads rows into a batch: ``targets``
    (B, T) holds the gold ids at the positions :meth:`logits` (B, T, V) predicts (the answer, then for the
    generating forms the line break after it), ``IGNORE`` elsewhere; ``end`` (B, 1) is the position of
    that last token (-1: none) and ``ends`` (B, E) the tokens that may stand there, since an answer is
    finished by any of them (-1 pads)."""

    name = ""
    objective = ""

    def __init__(self, tokenizer_size: int):
        self.tokenizer_size = tokenizer_size

    def model_config(self, size: str, seq_len: int) -> ModelConfig:
        dim, layers = parse_size(size)
        return ModelConfig(vocab_size=self.tokenizer_size, max_seq_len=seq_len, dim=dim, num_layers=layers,
                           num_heads=dim // HEAD_DIM, num_kv_heads=dim // HEAD_DIM)

    def pretrain_stage(self, train: np.ndarray, val: np.ndarray, seq_len: int, seed: int):
        raise NotImplementedError

    def rows(self, question: Question) -> dict[str, list[int]]:
        raise NotImplementedError

    def logits(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def length(self, question: Question) -> int:
        """The longest sequence the model reads for ``question``."""
        return max(len(ids) for ids in self.rows(question).values())

    def collate(self, questions: list[Question], device: torch.device) -> dict[str, torch.Tensor]:
        """Rows padded on the right (``targets`` with IGNORE, ids with padding, ``*_mask`` with 0)."""
        rows = [self.rows(q) for q in questions]
        batch = {}
        for name in rows[0]:
            fill = {"targets": IGNORE, "ends": -1}.get(name, 0 if name.endswith("mask") else PAD_ID)
            width = max(len(r[name]) for r in rows)
            batch[name] = torch.tensor([r[name] + [fill] * (width - len(r[name])) for r in rows], device=device)
        return batch


class DecoderForm(Form):
    name, objective = "decoder", "next-token prediction"

    def pretrain_stage(self, train, val, seq_len, seed):
        return PretrainStage(train, seq_len, seed, val_tokens=val)

    def rows(self, question):
        ids = [BOS, *question.prefix, *question.answer, question.newline[0]]
        scored = len(question.answer) + 1  # the answer, and the line break after it
        return {"inputs": ids[:-1], "targets": [IGNORE] * (len(ids) - 1 - scored) + ids[-scored:],
                "end": [len(ids) - 2], "ends": [question.newline[0], EOS]}

    def logits(self, model, batch):
        return model(batch["inputs"])  # causal: padding after a row changes none of its positions


class EncoderForm(Form):
    name, objective = "encoder", "masked-token prediction (BERT)"

    def model_config(self, size, seq_len):
        config = super().model_config(size, seq_len)
        config.causal, config.head = False, "mlm"
        return config

    def pretrain_stage(self, train, val, seq_len, seed):
        return MaskedLMStage(train, seq_len, seed, self.tokenizer_size, val_tokens=val)

    def rows(self, question):
        ids = [BOS, *question.prefix, *[MASK_ID] * len(question.answer), *question.newline, EOS]
        start = 1 + len(question.prefix)
        targets = [IGNORE] * len(ids)
        targets[start:start + len(question.answer)] = question.answer
        return {"inputs": ids, "targets": targets, "attention_mask": [1] * len(ids), "end": [-1], "ends": [-1]}

    def logits(self, model, batch):
        return model(batch["inputs"], mask=padding_mask(batch["attention_mask"]))


class EncoderDecoderForm(Form):
    name, objective = "encoder-decoder", "span corruption (T5)"

    def __init__(self, tokenizer_size: int):
        super().__init__(tokenizer_size)
        self.sentinels = sentinel_ids(tokenizer_size + NUM_SENTINELS)

    def model_config(self, size, seq_len):
        config = super().model_config(size, seq_len)
        config.vocab_size = self.tokenizer_size + NUM_SENTINELS  # the sentinels above the tokenizer's ids
        config.decoder_layers = config.num_layers - config.num_layers // 2
        config.num_layers //= 2
        return config

    def pretrain_stage(self, train, val, seq_len, seed):
        return SpanCorruptionStage(train, seq_len, seed, self.sentinels, val_tokens=val)

    def rows(self, question):
        first = self.sentinels[0]
        source = [BOS, *question.prefix, first, EOS]  # the hidden run last, as in every pretraining window
        decoder = [first, *question.answer, question.newline[0]]  # after the start token; the sentinel is given
        return {"sources": source, "source_mask": [1] * len(source), "decoder_inputs": [0, *decoder[:-1]],
                "targets": [IGNORE, *decoder[1:]], "end": [len(decoder) - 1],
                "ends": [question.newline[0], EOS, self.sentinels[1]]}  # a span also ends at the next sentinel

    def logits(self, model, batch):
        return model(batch["sources"], batch["decoder_inputs"], batch["source_mask"])


FORM_CLASSES = {form.name: form for form in (DecoderForm, EncoderForm, EncoderDecoderForm)}


# ---- multitask tuning and scoring ------------------------------------------------------------------------

class AnswerStage:
    """Multitask fine-tuning for :func:`lmforge.train.fit`: batches of questions, the loss on the answer
    tokens only (each epoch visits every question once, in an order drawn from the seed)."""

    def __init__(self, form: Form, questions: list[Question], seed: int):
        self.form, self.questions, self.seed = form, questions, seed

    def batch(self, step: int, first: int, size: int, global_size: int, device: torch.device) -> dict:
        rows = epoch_rows(self.seed, len(self.questions), step, first, size, global_size)
        return self.form.collate([self.questions[i] for i in rows], device)

    def loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        logits = self.form.logits(model, batch).float()
        return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)

    def evaluate(self, model, runtime, max_tokens, batch_size) -> dict:
        return {}


@torch.no_grad()
def judge(form: Form, model: torch.nn.Module, questions: list[Question], runtime: Runtime, batch_size: int = 32
          ) -> dict[str, np.ndarray]:
    """Per question: ``right`` (each answer token the likeliest, then one of the ``ends``), ``logprob``
    (the gold answer tokens' log-likelihood, summed), ``tokens`` (answer tokens) and ``tokens_right``."""
    model.eval()
    out: dict[str, list] = {"right": [], "logprob": [], "tokens": [], "tokens_right": []}
    for first in range(0, len(questions), batch_size):
        batch = form.collate(questions[first:first + batch_size], runtime.device)
        with runtime.autocast():
            logits = form.logits(model, batch).float()
        targets, end = batch["targets"], batch["end"]
        guess = logits.argmax(-1)
        scored = (targets != IGNORE) & (torch.arange(targets.shape[1], device=end.device) != end)  # the answer
        hit = guess == targets
        finished = (guess.gather(1, end.clamp(min=0)) == batch["ends"]).any(dim=1) | (end[:, 0] < 0)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        out["right"] += ((hit | ~scored).all(dim=1) & finished).tolist()
        out["logprob"] += (logp * scored).sum(dim=1).tolist()
        out["tokens"] += scored.sum(dim=1).tolist()
        out["tokens_right"] += (hit & scored).sum(dim=1).tolist()
    return {name: np.array(values) for name, values in out.items()}


def score(form: Form, model: torch.nn.Module, questions: list[Question], runtime: Runtime, batch_size: int = 32
          ) -> dict:
    """Exact match with its binomial standard error, overall and per kind; the share of scored tokens
    right; the mean log-likelihood per scored token."""
    verdict = judge(form, model, questions, runtime, batch_size)
    right, tokens = verdict["right"], verdict["tokens"].sum()
    exact = float(right.mean())
    kinds = [q.kind for q in questions]
    return {"exact": exact, "exact_se": math.sqrt(exact * (1 - exact) / len(right)),
            "token_accuracy": float(verdict["tokens_right"].sum() / tokens),
            "answer_logprob": float(verdict["logprob"].sum() / tokens),
            "by_kind": {kind: float(right[[k == kind for k in kinds]].mean()) for kind in dict.fromkeys(kinds)},
            "questions": len(right)}


def step_flops(model: torch.nn.Module, stage, batch_size: int) -> float:
    """FLOPs of one training step (forward and backward) of ``model`` on ``stage``'s first batch, counted by
    torch's FLOP counter on a copy with eager attention (whose products the counter sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    probe = build_model(model.config, attention="eager")
    probe.load_state_dict(model.state_dict())
    batch = stage.batch(0, 0, batch_size, batch_size, torch.device("cpu"))
    with FlopCounterMode(display=False) as counter:
        stage.loss(probe, batch).backward()
    return float(counter.get_total_flops())


# ---- the study -------------------------------------------------------------------------------------------

def prepare(config: ArchitecturesConfig, out: Path):
    """Tokenizer, pretraining streams, and the training and held-out questions (made once, then read back)."""
    from lmforge.data import DataConfig, iter_prepared, prepare_data
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    train_tasks, eval_tasks = train_eval_tasks(config.task_items, config.eval_items, config.seed, config.kinds)
    if not (out / "data" / "manifest.json").is_file():
        prepare_data(config.inputs, out / "data", DataConfig(seed=config.seed, max_bytes=config.max_bytes or None),
                     progress=config.progress)
    task_lines = ["".join(f"Q: {t.prompt} A: {t.answer}\n" for t in train_tasks[i:i + BLOCK_ITEMS])
                  for i in range(0, len(train_tasks), BLOCK_ITEMS)]
    if not (out / "tokenizer.json").is_file():
        texts = [*iter_prepared(out / "data", "train"), *task_lines]
        tokenizer = train_tokenizer(texts, config.vocab_size, progress=config.progress)
        tokenizer.save(out / "tokenizer.json")
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    streams = {}
    for split in ("train", "val"):
        path = out / f"{split}.npy"
        if not path.is_file():
            documents = [[BOS, *ids, EOS] for ids in tokenizer.encode_batch(list(iter_prepared(out / "data", split)))]
            if split == "train":  # the task lines, in blocks, shuffled in among the corpus's documents
                for i in range(0, len(train_tasks), BLOCK_ITEMS):
                    ids = [BOS]
                    for task in train_tasks[i:i + BLOCK_ITEMS]:
                        q, a, nl = line_ids(tokenizer, task)
                        ids += q + a + nl
                    documents.append(ids + [EOS])
                random.Random(f"{config.seed}:documents").shuffle(documents)
            np.save(path, np.array([t for doc in documents for t in doc], dtype=np.uint16))
        streams[split] = np.load(path, mmap_mode="r")
    return tokenizer, streams, train_tasks, eval_tasks


@dataclass
class Plan:
    """One form's pretraining and tuning, and what they cost."""

    form: Form
    model_config: ModelConfig
    pretrain: Stage  # the form's pretraining stage
    tune: AnswerStage
    step_flops: float
    steps: int
    parameters: int
    tune_step_flops: float
    seconds: float = 0.0  # estimated for the phases not finished yet


def plan_forms(config: ArchitecturesConfig, tokenizer, streams, questions: list[Question]) -> list[Plan]:
    plans = []
    for name in config.forms:
        form = FORM_CLASSES[name](tokenizer.vocab_size)
        model_config = form.model_config(config.size, config.seq_len)
        stage = form.pretrain_stage(streams["train"], streams["val"], config.seq_len, config.seed)
        torch.manual_seed(config.seed)
        model = build_model(model_config)
        tune = AnswerStage(form, questions, config.seed)
        flops = step_flops(model, stage, config.batch_size)
        plans.append(Plan(form, model_config, stage, tune, flops, max(1, round(config.flops / flops)),
                          model.num_parameters(embeddings=False), step_flops(model, tune, config.batch_size)))
    return plans


def check_time(config: ArchitecturesConfig, plans: list[Plan], out: Path) -> None:
    """Print the plan, and refuse (InputError) one whose unfinished phases need more than ``minutes``,
    estimated from a few timed steps of each form."""
    from lmforge.train.loop import seconds_per_step

    runtime = Runtime.resolve(config.device, config.dtype)
    for p in plans:
        folder = out / "runs" / p.form.name
        torch.manual_seed(config.seed)
        model = build_model(p.model_config)
        probe = train_config(config, 1, folder)
        if not (folder / "pretrain" / "result.json").is_file():
            p.seconds += p.steps * seconds_per_step(model, p.pretrain, probe, runtime, config.batch_size)
        if not (folder / "tuned" / "result.json").is_file():
            p.seconds += config.tune_steps * seconds_per_step(model, p.tune, probe, runtime, config.batch_size)
        print(f"[study] {p.form.name}: {p.parameters:,} parameters without embeddings, {p.step_flops:.3g} FLOPs "
              f"per step -> {p.steps} pretraining steps; {p.seconds / 60:.1f} min left", flush=True)
    estimate = sum(p.seconds for p in plans) / 60
    if estimate > config.minutes:
        raise InputError(f"the study needs about {estimate:.0f} minutes, more than --minutes {config.minutes:g}: "
                         "lower --flops or --tune-steps, a smaller --size, or raise --minutes")


def measure(p: Plan, model: torch.nn.Module, config: ArchitecturesConfig, zero: list[Question],
            few: list[Question], runtime: Runtime) -> dict:
    return {"zero-shot": score(p.form, model, zero, runtime, config.batch_size),
            "few-shot": score(p.form, model, few, runtime, config.batch_size)}


def run_form(p: Plan, config: ArchitecturesConfig, tokenizer, out: Path, zero: list[Question],
             few: list[Question]) -> dict:
    """Pretrain one form and score it, then tune it and score it again; finished phases are read back."""
    from lmforge.checkpoint import load_model

    runtime = Runtime.resolve(config.device, config.dtype)
    folder = out / "runs" / p.form.name
    phases = {}
    for phase in ("pretrain", "tuned"):
        path = folder / phase / "result.json"
        if path.is_file():
            phases[phase] = read_json(path, "a study result")
            continue
        t0 = time.perf_counter()
        resume = (folder / phase / "checkpoint" / "trainer_state.json").is_file()
        if phase == "pretrain":
            print(f"[study] {p.form.name}: pretraining ({p.form.objective}), {p.steps} steps", flush=True)
            torch.manual_seed(config.seed)
            model = build_model(p.model_config)
            fit(model, p.pretrain, train_config(config, p.steps, folder / phase), tokenizer=tokenizer,
                resume=resume)
            final = p.pretrain.evaluate(model, runtime, 32 * config.seq_len * config.batch_size, config.batch_size)
        else:
            print(f"[study] {p.form.name}: multitask tuning, {config.tune_steps} steps", flush=True)
            model = load_model(folder / "pretrain" / "checkpoint")
            fit(model, p.tune, train_config(config, config.tune_steps, folder / phase, config.tune_lr),
                tokenizer=tokenizer, resume=resume)
            final = {}
        phases[phase] = {**measure(p, model, config, zero, few, runtime), "seconds": time.perf_counter() - t0,
                         **{f"pretrain_{k}": v for k, v in final.items()}}
        write_json_atomic(path, phases[phase])
    pre, tuned = phases["pretrain"], phases["tuned"]
    return {"form": p.form.name, "objective": p.form.objective, "parameters": p.parameters,
            "layers": [p.model_config.num_layers, p.model_config.decoder_layers], "step_flops": p.step_flops,
            "steps": p.steps, "flops": p.steps * p.step_flops,
            "text_tokens": p.steps * config.batch_size * config.seq_len,
            "tune_flops": config.tune_steps * p.tune_step_flops,
            "scores": {"zero-shot": pre["zero-shot"], "few-shot": pre["few-shot"],
                       "tuned zero-shot": tuned["zero-shot"], "tuned few-shot": tuned["few-shot"]},
            "validation": {k: v for k, v in pre.items() if k.startswith("pretrain_")},
            "seconds": pre["seconds"] + tuned["seconds"]}


def check_lengths(config: ArchitecturesConfig, forms: list[Form], questions: list[Question]) -> None:
    longest = max(form.length(q) for form in forms for q in questions)
    if longest > config.seq_len:
        raise InputError(f"a question of {longest} tokens (with its {config.shots} solved questions) is longer than "
                         f"--seq-len {config.seq_len}: fewer --shots or a longer --seq-len")


def architectures_study(config: ArchitecturesConfig) -> Path:
    """Run (or resume) the study; returns the path of results.md."""
    out = Path(config.out)
    check_same_study(config, out, SAME_STUDY, DATA_SETTINGS)
    tokenizer, streams, train_tasks, eval_tasks = prepare(config, out)
    zero = [make_question(tokenizer, task, []) for task in eval_tasks]
    few = [make_question(tokenizer, task, shots)
           for task, shots in zip(eval_tasks, pick_shots(train_tasks, eval_tasks, config.shots, config.seed))]
    tuning = [make_question(tokenizer, task, shots if i % 2 else [])  # half zero-shot, half few-shot
              for i, (task, shots) in enumerate(zip(train_tasks, pick_shots(train_tasks, train_tasks, config.shots,
                                                                            config.seed + 1)))]
    check_lengths(config, [FORM_CLASSES[name](tokenizer.vocab_size) for name in config.forms], few + tuning)
    plans = plan_forms(config, tokenizer, streams, tuning)
    check_time(config, plans, out)
    rows = [run_form(p, config, tokenizer, out, zero, few) for p in plans]
    results = {"config": to_dict(config), "runtime": Runtime.resolve(config.device, config.dtype).describe(),
               "data_tokens": len(streams["train"]), "forms": rows,
               "example": {"zero-shot": f"Q: {eval_tasks[0].prompt} A: {eval_tasks[0].answer}",
                           "few-shot": tokenizer.decode(few[0].prefix + few[0].answer)}}
    write_json_atomic(out / "results.json", results)
    from lmforge.study.report import write_architectures_report

    return write_architectures_report(out, results)


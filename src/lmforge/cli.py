"""``lmforge <command>``: a thin layer over the Python API.

Every flag comes from a typed config dataclass (its field's help line is the
flag's --help). Bad input exits with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge.errors import InputError
from lmforge.files import read_text, write_failure, write_json_atomic, write_text_atomic
from lmforge.settings import add_arguments, build, load_json

DEFAULT_RUN = Path("runs") / "speedrun"
WEIGHTS_HELP = ("store the weights in 16 bits, arithmetic in fp32: half the memory, and with --compile "
                "faster decoding on CPUs without native bf16")
COMPILE_CPP_HELP = ("with --compile: the compiled step's kernels run from C++, not Python: 5-11%% fewer ms a token "
                    "for small models and int4 weights, twice the compile time")


def _tokenizer_path(value: str | None) -> Path:
    """A tokenizer.json, a folder holding one, or the last speedrun's."""
    path = Path(value) if value else DEFAULT_RUN / "tokenizer.json"
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        hint = "" if value else " (no --tokenizer given; run `lmforge speedrun` or `lmforge tokenizer train` first)"
        raise InputError(f"tokenizer not found: {path}{hint}")
    return path


# -- commands ---------------------------------------------------------------------------------------------

def cmd_speedrun(args: argparse.Namespace) -> None:
    from lmforge.speedrun import SpeedrunConfig, speedrun

    speedrun(build(SpeedrunConfig, args))


def cmd_study_scaling(args: argparse.Namespace) -> None:
    from lmforge.study.scaling import ScalingConfig, scaling_study

    report = scaling_study(build(ScalingConfig, args))
    print(f"results: {report}")


def cmd_study_architectures(args: argparse.Namespace) -> None:
    from lmforge.study.architectures import ArchitecturesConfig, architectures_study

    report = architectures_study(build(ArchitecturesConfig, args))
    print(f"results: {report}")


def cmd_study_emergence(args: argparse.Namespace) -> None:
    from lmforge.study.emergence import EmergenceConfig, emergence_study

    report = emergence_study(build(EmergenceConfig, args))
    print(f"results: {report}")


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from lmforge.data import DataConfig, prepare_data

    manifest = prepare_data(args.inputs, Path(args.out), build(DataConfig, args), progress=not args.quiet)
    splits = manifest["splits"]
    print(f"read {manifest['documents_read']} documents, kept {manifest['documents_kept']}; "
          f"train {splits['train']['bytes'] / 1e6:.2f} MB, val {splits['val']['bytes'] / 1e6:.2f} MB; "
          f"dropped {json.dumps(manifest['dropped'])}; errors {json.dumps(manifest['errors'])}")
    print(f"wrote {args.out}/manifest.json")


def cmd_data_shard(args: argparse.Namespace) -> None:
    from lmforge.data import write_shards
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(_tokenizer_path(args.tokenizer))
    meta = write_shards(Path(args.data), tokenizer, Path(args.out), progress=not args.quiet)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['num_tokens']:,} tokens from {info['num_docs']:,} documents")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from lmforge.data import iter_prepared
    from lmforge.tokenizer import bytes_per_token, train_tokenizer

    tokenizer = train_tokenizer(iter_prepared(Path(args.data), "train"), args.vocab_size, progress=not args.quiet)
    out = Path(args.out)
    tokenizer.save(out)
    val = list(iter_prepared(Path(args.data), "val"))
    if val:
        print(f"validation compression: {bytes_per_token(tokenizer, val):.3f} bytes per token")
    print(f"wrote {out} ({tokenizer.vocab_size} tokens)")


def cmd_embed(args: argparse.Namespace) -> None:
    import numpy as np

    from lmforge.embed import load

    texts = list(args.texts)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise InputError(f"--input {path}: no such file")
        texts += [line for line in read_text(path, "--input file").splitlines() if line.strip()]
    if not texts:
        raise InputError("give texts to embed, or --input FILE with one text per line")
    embedder = load(args.model, device=args.device, dtype=args.dtype)
    vectors = embedder.encode(texts, batch_size=args.batch_size, progress=len(texts) > 64)
    if args.out:
        from lmforge.files import new_file

        with new_file(args.out, "the vectors") as temporary, open(temporary, "wb") as handle:
            np.save(handle, vectors)
        print(f"wrote {len(texts)} vectors of dim {embedder.dim} to {args.out}")
        return
    print(f"{len(texts)} text(s), dim {embedder.dim}, {embedder.pooling} pooling"
          f"{', normalized' if embedder.normalize else ''}")
    for text, vector in zip(texts, vectors):
        print(f"  {' '.join(f'{v:+.3f}' for v in vector[:6])} ...  {text[:60]!r}")
    if 1 < len(texts) <= 12:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        similarity = (vectors / norms) @ (vectors / norms).T
        print("cosine similarity:")
        for i, row in enumerate(similarity):
            print(f"  [{i}] " + " ".join(f"{v:5.2f}" for v in row))


def cmd_rag_index(args: argparse.Namespace) -> None:
    from lmforge.rag import index_paths

    report = index_paths(args.paths, args.out, encoder=args.encoder, max_tokens=args.max_tokens,
                         overlap=args.overlap, batch_size=args.batch_size, ann=args.ann, progress=not args.quiet)
    print(f"{args.out}: {report.chunks} chunks from {report.files} files ({report.files_read} read); "
          f"{report.added} embedded, {report.kept} kept, {report.removed} removed"
          f"{', HNSW graph built' if report.ann else ''}, in {report.seconds:.1f}s")


def cmd_rag_search(args: argparse.Namespace) -> None:
    from lmforge.rag import KnowledgeBase, Retriever

    retriever = Retriever(KnowledgeBase(args.kb), reranker=_reranker(args), exact=args.exact)
    hits = retriever.search(args.query, k=args.k, method=args.method, rerank=bool(args.rerank),
                            weights=tuple(args.weights))
    if not hits:
        print("no chunk matches")
    for hit in hits:
        text = " ".join(hit.chunk.text.split())
        print(f"[{hit.rank}] {hit.score:.4f}  {hit.chunk.title}  ({hit.chunk.source}:{hit.chunk.start}-{hit.chunk.end})")
        print(f"    {text[:args.width]}{'...' if len(text) > args.width else ''}")


def _reranker(args: argparse.Namespace):
    """The language-model reranker of ``--rerank MODEL`` (None without it)."""
    if not args.rerank:
        return None
    from lmforge.api import load
    from lmforge.eval.harness import LocalModel
    from lmforge.rag.rerank import LMReranker

    lm = load(args.rerank, device=args.device, dtype=args.dtype)
    return LMReranker(LocalModel(lm, name=args.rerank, chat=True, progress=False))  # the question as a user turn


def cmd_rag_ask(args: argparse.Namespace) -> None:
    from lmforge.rag import KnowledgeBase, Retriever
    from lmforge.rag.ask import ask

    retriever = Retriever(KnowledgeBase(args.kb), reranker=_reranker(args), exact=args.exact)
    answer = ask(retriever, args.question, _rag_generator(args), k=args.k, method=args.method, min_score=args.min_score,
                 max_new_tokens=args.max_new_tokens, rerank=bool(args.rerank))
    print(answer.text)
    if answer.sources:
        print("\nsources:")
        for number, hit in enumerate(answer.sources, 1):
            mark = "*" if number in answer.cited else " "
            print(f" {mark}[{number}] {hit.chunk.title}  ({hit.chunk.source}:{hit.chunk.start}-{hit.chunk.end})")


def cmd_rag_eval(args: argparse.Namespace) -> None:
    from lmforge.rag import KnowledgeBase, Retriever
    from lmforge.rag.evaluate import evaluate_retrieval, format_table, read_questions, sampled_questions

    kb = KnowledgeBase(args.kb)
    questions = read_questions(args.questions) if args.questions else sampled_questions(kb, args.count, seed=args.seed)
    methods = tuple(args.methods) + (("hybrid+rerank",) if args.rerank else ())
    retriever = Retriever(kb, reranker=_reranker(args), exact=args.exact)
    results = evaluate_retrieval(retriever, questions, methods, weights=tuple(args.weights))
    print(format_table(results, len(questions)))
    report = {"questions": len(questions), "results": results}
    if args.model or args.base_url:
        from lmforge.rag.evaluate import evaluate_answers, format_answer_table

        summary, records = evaluate_answers(retriever, questions, _rag_generator(args), judge=_claim_judge(args),
                                            k=args.k, min_score=args.min_score, max_new_tokens=args.max_new_tokens,
                                            rerank=bool(args.rerank))
        print(f"\nanswers by {args.model or args.base_url} (hybrid{'+rerank' if args.rerank else ''}, k={args.k}; "
              f"claims judged by {args.judge or 'word coverage'})\n\n" + format_answer_table(summary))
        report |= {"answers": summary, "replies": records}
    if args.out:
        write_json_atomic(args.out, report)


def cmd_rag_langref(args: argparse.Namespace) -> None:
    from lmforge.rag.langref import write_topics

    print(f"wrote {len(write_topics(args.out))} language-reference topics to {args.out}")


def _rag_generator(args: argparse.Namespace):
    """The answering model of rag ask / rag eval: --base-url's server, or --model loaded here."""
    from lmforge.rag.ask import endpoint_generator, local_generator

    if args.base_url:
        return endpoint_generator(args.base_url, model=args.model, api_key=args.api_key)
    from lmforge.api import load

    return local_generator(load(args.model or "smollm2-135m-instruct", device=args.device, dtype=args.dtype))


def _claim_judge(args: argparse.Namespace):
    """--judge MODEL: a language model judges the claims (None: word coverage)."""
    if not args.judge:
        return None
    from lmforge.api import load
    from lmforge.eval.harness import LocalModel
    from lmforge.rag.support import ModelJudge

    lm = load(args.judge, device=args.device, dtype=args.dtype)
    return ModelJudge(LocalModel(lm, name=args.judge, chat=True, progress=False))


def cmd_rag_train_retriever(args: argparse.Namespace) -> None:
    from lmforge.rag.train import train_retriever

    report = train_retriever(args.kb, args.out, encoder=args.encoder, steps=args.steps, batch_size=args.batch_size,
                             lr=args.lr, questions_per_chunk=args.questions_per_chunk, temperature=args.temperature,
                             seed=args.seed, progress=not args.quiet)
    print(f"{report['train_pairs']} training pairs, {report['steps']} steps; {report['test_questions']} held-out "
          "questions, dense retrieval over the whole knowledge base:")
    names = list(report["before"])
    print("| encoder | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for label in ("before", "after"):
        print(f"| {label} | " + " | ".join(f"{report[label][n]:.3f}" for n in names) + " |")
    print(f"trained encoder: {report['checkpoint']} (index again with --encoder {report['checkpoint']})")


def cmd_tokenize(args: argparse.Namespace) -> None:
    from lmforge.tokenizer import Tokenizer, format_tokens

    tokenizer = Tokenizer.from_file(_tokenizer_path(args.tokenizer))
    text = sys.stdin.read() if args.text == "-" else args.text
    if args.ids:
        print(" ".join(map(str, tokenizer.encode(text))))
    else:
        print(format_tokens(tokenizer, text))


def _model_config(args: argparse.Namespace, extra: dict | None = None):
    from lmforge.model import PRESETS, ModelConfig

    if args.preset not in PRESETS:
        raise InputError(f"unknown model preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    base = {**PRESETS[args.preset], **(extra or {})}
    if args.model_config:
        base.update(load_json(args.model_config))
    return build(ModelConfig, args, base=base)


def cmd_model_info(args: argparse.Namespace) -> None:
    from lmforge.checkpoint import is_checkpoint
    from lmforge.model import (
        PRESETS,
        ModelConfig,
        build_model,
        forward_flops_per_token,
        train_flops_per_token,
    )

    if args.list:
        for name in PRESETS:
            _print_model_info(name, ModelConfig.from_dict(PRESETS[name]), build_model, forward_flops_per_token,
                              train_flops_per_token, short=True)
        return
    if args.checkpoint:
        if not is_checkpoint(args.checkpoint):
            raise InputError(f"{args.checkpoint} is not an lmforge checkpoint")
        config, name = ModelConfig.load(Path(args.checkpoint) / "config.json"), args.checkpoint
    else:
        config, name = _model_config(args), args.preset
    _print_model_info(name, config, build_model, forward_flops_per_token, train_flops_per_token)


def _print_model_info(name, config, build_model, forward_flops, train_flops, short: bool = False) -> None:
    import torch

    with torch.device("meta"):
        model = build_model(config)
    params, body = model.num_parameters(), model.num_parameters(embeddings=False)
    fwd = forward_flops(config)
    if short:
        layers = (f"{config.num_layers}+{config.decoder_layers}" if config.is_encoder_decoder
                  else str(config.num_layers))
        print(f"{name:>10}: {params / 1e6:8.2f}M params, dim {config.dim}, {layers} layers, "
              f"{config.num_heads}/{config.num_kv_heads} heads ({config.attention_kind}), "
              f"{fwd / 1e6:.0f} MFLOP/token forward")
        return
    print(f"model {name}")
    for key, value in config.to_dict().items():
        print(f"  {key:>15}: {value}")
    print(f"  attention: {config.attention_kind}")
    print(f"  parameters: {params:,} ({body:,} without embeddings)")
    print(f"  FLOPs per token at context {config.max_seq_len}: forward {fwd / 1e6:.1f}M, "
          f"training {train_flops(config) / 1e6:.1f}M")


def cmd_pretrain(args: argparse.Namespace) -> None:
    import torch

    from lmforge.data.shards import load_shard
    from lmforge.model import ModelConfig, build_model
    from lmforge.tokenizer import Tokenizer
    from lmforge.train import PretrainStage, TrainConfig, fit
    from lmforge.train.loop import checkpoint_dir
    from lmforge.train.span import NUM_SENTINELS, SpanCorruptionStage, sentinel_ids

    train_config = build(TrainConfig, args, base=load_json(args.train_config) if args.train_config else None)
    tokenizer = Tokenizer.from_file(_tokenizer_path(args.tokenizer))
    objective = args.objective
    mlm, span = objective == "mlm", objective == "span"
    if args.nsp and not mlm:
        raise InputError("--nsp (next-sentence prediction) goes with --objective mlm")
    if objective != "clm" and train_config.sample_every:
        raise InputError(f"--sample-every shows generated text; a model trained with --objective {objective} "
                         "does not continue text (train with clm, or leave --sample-every at 0)")
    if objective != "clm" and args.qat:
        raise InputError(f"--qat trains a decoder for an integer checkpoint; it does not go with --objective "
                         f"{objective}")
    if args.preset is None:
        args.preset = {"clm": "cpu-small", "mlm": "bert-small", "span": "t5-small"}[objective]
    ckpt = checkpoint_dir(train_config)
    torch.manual_seed(train_config.seed)
    if args.resume:
        model = build_model(ModelConfig.load(ckpt / "config.json"))  # weights come from the checkpoint in fit()
    elif args.init_from:  # continued pretraining of any model lmforge reads
        from lmforge.checkpoint import load_model

        model = load_model(args.init_from)
        if train_config.seq_len > model.config.max_seq_len:
            raise InputError(f"--seq-len {train_config.seq_len} exceeds {args.init_from}'s max_seq_len "
                             f"{model.config.max_seq_len}")
    else:
        # span corruption's sentinels are ids above the tokenizer's (T5's <extra_id_i>)
        vocab = tokenizer.vocab_size + (NUM_SENTINELS if span else 0)
        extra = {"vocab_size": vocab, "max_seq_len": train_config.seq_len}
        if args.nsp:
            extra["head"] = "mlm+nsp"
        model = build_model(_model_config(args, extra))
    config = model.config
    if config.vocab_size < tokenizer.vocab_size:
        raise InputError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    form = ("an encoder-decoder (decoder_layers > 0: --preset t5-small)" if span else
            "an encoder with a masked-LM head (causal=false, head mlm or mlm+nsp: --preset bert-small)" if mlm else
            "a causal decoder with head lm")
    fits = (config.is_encoder_decoder if span else not config.is_encoder_decoder and (
        (not config.causal and config.head.startswith("mlm")) if mlm else config.causal))
    if not fits:
        raise InputError(f"--objective {objective} needs {form}; this model has decoder_layers="
                         f"{config.decoder_layers}, causal={config.causal}, head {config.head!r}")
    if args.nsp and config.head != "mlm+nsp":
        raise InputError(f"--nsp needs the mlm+nsp head; this model has {config.head!r}")
    spec = None
    if args.qat:
        from lmforge.quant.qat import prepare_qat, qat_spec

        spec = qat_spec(args.qat)
        prepare_qat(model, spec)
    shards = Path(args.shards)
    if mlm:
        from lmforge.train.mlm import MaskedLMStage

        stage = MaskedLMStage(load_shard(shards, "train"), train_config.seq_len, train_config.seed,
                              tokenizer.vocab_size, val_tokens=load_shard(shards, "val"), nsp=args.nsp)
    elif span:
        sentinels = sentinel_ids(config.vocab_size)
        if min(sentinels) < tokenizer.vocab_size:
            raise InputError(f"span corruption needs {NUM_SENTINELS} sentinel ids above the tokenizer's "
                             f"{tokenizer.vocab_size}; this model's vocab_size is {config.vocab_size}")
        try:
            stage = SpanCorruptionStage(load_shard(shards, "train"), train_config.seq_len, train_config.seed,
                                        sentinels, val_tokens=load_shard(shards, "val"),
                                        noise_density=args.noise_density, mean_span_length=args.mean_span_length)
        except ValueError as err:
            raise InputError(str(err)) from err
    else:
        stage = PretrainStage(load_shard(shards, "train"), train_config.seq_len, train_config.seed,
                              val_tokens=load_shard(shards, "val"), token_bytes=tokenizer.token_byte_lengths())
    sample_fn = None
    if train_config.sample_every:
        from lmforge.eval.samples import sample_texts

        def sample_fn(m):
            return [s["prompt"] + s["completion"] for s in sample_texts(m, tokenizer, None, max_new_tokens=32)]
    result = fit(model, stage, train_config, tokenizer=tokenizer, resume=args.resume, sample_fn=sample_fn)
    print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min "
          f"({result.tokens_per_second:,.0f} tokens/s, MFU {result.mfu:.1%}); {result.final}")
    print(f"checkpoint: {result.checkpoint}")
    if spec is not None:  # QAT: the integer checkpoint holds exactly the weights the forward passes used
        from lmforge.quant.ptq import quantize_checkpoint

        quantized = Path(train_config.out_dir) / "quantized"
        report = quantize_checkpoint(result.checkpoint, quantized, spec, eval_items=0)  # (bits per byte only)
        print(f"quantized ({spec.name}): {quantized}; bits per byte on the language reference "
              f"{report.bpb_before:.4f} with the float weights, {report.bpb_after:.4f} with the integer ones")


CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256, "repetition_penalty": 1.05}


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.api import load
    from lmforge.chat import ChatSession, run_chat
    from lmforge.infer.sampling import SamplingConfig

    lm = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile, weights=args.weights,
              compile_cpp=args.compile_cpp, **_speculative_options(args))
    sampling = vars(build(SamplingConfig, args, base=CHAT_SAMPLING))
    run_chat(ChatSession(lm, system=args.system, sampling=sampling), input, sys.stdout)


SFT_DEFAULTS = {"out_dir": "runs/sft", "max_steps": 200, "warmup_steps": 10, "batch_size": 8, "seq_len": 256,
                "eval_every": 50, "eval_tokens": 16384, "save_every": 100, "weight_decay": 0.0}


def cmd_sft(args: argparse.Namespace) -> None:
    from lmforge.finetune import FinetuneConfig, finetune
    from lmforge.train import TrainConfig

    config = build(FinetuneConfig, args)
    lr = 2e-5 if config.method == "full" else 1e-3  # adapters start at zero and need a larger step
    train_config = build(TrainConfig, args, base={**SFT_DEFAULTS, "lr": lr})
    summary = finetune(config, train_config, resume=args.resume)
    print(f"fine-tuned ({config.method}) on {summary['train_conversations']} conversations, "
          f"{summary['trainable_parameters']:,} trainable parameters, {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min; {summary['final']}")
    if summary["task_accuracy_before"]:
        before, after = summary["task_accuracy_before"]["accuracy"], summary["task_accuracy_after"]["accuracy"]
        print("held-out task accuracy, before -> after: "
              + ", ".join(f"{kind} {before[kind]:.0%} -> {after[kind]:.0%}" for kind in after))
    print(f"model: {summary['model']}")
    if summary["quantized"]:
        print(f"quantized ({config.qat}): {summary['quantized']['model']}")


DISTILL_DEFAULTS = {"out_dir": "runs/draft", "max_steps": 500, "warmup_steps": 20, "batch_size": 8, "seq_len": 512,
                    "lr": 2e-3, "eval_every": 100, "eval_tokens": 16384, "save_every": 100}


def cmd_distill(args: argparse.Namespace) -> None:
    from lmforge.distill import DistillConfig, distill
    from lmforge.train import TrainConfig

    config = build(DistillConfig, args)
    summary = distill(config, build(TrainConfig, args, base=DISTILL_DEFAULTS), resume=args.resume)
    print(f"distilled {config.teacher} ({summary['teacher_parameters'] / 1e6:.0f}M parameters) into a "
          f"{summary['student_parameters'] / 1e6:.1f}M-parameter draft on {summary['train_prompts']} answers, "
          f"{summary['steps']} steps in {summary['seconds'] / 60:.1f} min; {summary['final']}")
    check = summary["check"]
    if check:
        print(f"check on {check['prompts']} held-out prompts, {check['draft_tokens']} guesses a pass (eager, "
              f"batch 1): {check['acceptance']:.0%} of guesses kept, {check['tokens_per_pass']:.2f} tokens a pass, "
              f"{check['ms_per_token_draft']:.1f} ms a token against {check['ms_per_token_plain']:.1f} plain, "
              f"{check['same_output']} of {check['prompts']} outputs the plain ones")
    print(f"model: {summary['model']} (use it with --draft)")


def cmd_rm(args: argparse.Namespace) -> None:
    from lmforge.reward_model import RewardConfig, train_reward_model
    from lmforge.train import TrainConfig

    config = build(RewardConfig, args)
    lr = 1e-5 if config.method == "full" else 2e-4  # adapters start at zero and need a larger step
    train_config = build(TrainConfig, args, base={**SFT_DEFAULTS, "lr": lr, "out_dir": "runs/rm"})
    summary = train_reward_model(config, train_config, resume=args.resume)
    before, after = summary["before"], summary["after"]
    print(f"reward model trained on {summary['train_pairs']} pairs, {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min")
    if after:
        print(f"held-out pair accuracy {before['pair_accuracy']:.1%} -> {after['pair_accuracy']:.1%}, "
              f"mean margin {before['margin']:.3f} -> {after['margin']:.3f} ({summary['val_pairs']} pairs)")
    print(f"model: {summary['model']}")


def print_task_gain(summary: dict) -> None:
    """Held-out task accuracy before and after an alignment command, and the gain with its 95% interval."""
    if not summary["task_accuracy_before"]:
        return
    before, after = summary["task_accuracy_before"]["accuracy"], summary["task_accuracy_after"]["accuracy"]
    print(f"held-out task accuracy ({summary['held_out_tasks']} tasks), before -> after: "
          + ", ".join(f"{kind} {before[kind]:.0%} -> {after[kind]:.0%}" for kind in after))
    gain = summary["task_accuracy_gain"]
    print(f"gain {gain['gain']:+.1%} (95% CI {gain['ci95'][0]:+.1%} to {gain['ci95'][1]:+.1%})")


DPO_LR = {"full": 5e-6, "lora": 2e-4, "qlora": 2e-4}  # adapters start at zero and need a larger step


def cmd_dpo(args: argparse.Namespace) -> None:
    from lmforge.dpo import DPOConfig, train_dpo
    from lmforge.train import TrainConfig

    config = build(DPOConfig, args)
    train_config = build(TrainConfig, args, base={**SFT_DEFAULTS, "lr": DPO_LR[config.method], "out_dir": "runs/dpo"})
    summary = train_dpo(config, train_config, resume=args.resume)
    print(f"aligned ({config.loss}, {config.method}) on {summary['train_pairs']} pairs, "
          f"{summary['trainable_parameters']:,} trainable parameters, {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min")
    final = summary["final"]
    if final:
        print(f"held-out pairs ({summary['val_pairs']}): chosen wins {final['val_rewards/accuracies']:.1%}, "
              f"margin {final['val_rewards/margins']:.3f}, chosen {final['val_rewards/chosen']:.3f}, "
              f"rejected {final['val_rewards/rejected']:.3f}")
    print_task_gain(summary)
    print(f"model: {summary['model']}")


GRPO_LR = {"full": 1e-6, "lora": 1e-4, "qlora": 1e-4}
GRPO_DEFAULTS = {**SFT_DEFAULTS, "out_dir": "runs/grpo", "batch_size": 4, "max_steps": 100, "warmup_steps": 0,
                 "eval_every": 0, "save_every": 25, "log_every": 1}


def cmd_grpo(args: argparse.Namespace) -> None:
    from lmforge.grpo import GRPOConfig, train_grpo
    from lmforge.train import TrainConfig

    config = build(GRPOConfig, args)
    train_config = build(TrainConfig, args, base={**GRPO_DEFAULTS, "lr": GRPO_LR[config.method]})
    summary = train_grpo(config, train_config, resume=args.resume)
    print(f"GRPO ({config.loss}, {config.method}) on {summary['prompts']} prompts x {config.group_size} answers, "
          f"{summary['trainable_parameters']:,} trainable parameters, {summary['steps']} steps in "
          f"{summary['seconds'] / 60:.1f} min")
    print_task_gain(summary)
    print(f"model: {summary['model']}")


PPO_LR = {"full": 1e-6, "lora": 1e-4, "qlora": 1e-4}
PPO_DEFAULTS = {**SFT_DEFAULTS, "out_dir": "runs/ppo", "batch_size": 8, "max_steps": 200, "warmup_steps": 0,
                "eval_every": 0, "save_every": 20, "log_every": 4}


def cmd_ppo(args: argparse.Namespace) -> None:
    from lmforge.ppo import PPOConfig, train_ppo
    from lmforge.train import TrainConfig

    config = build(PPOConfig, args)
    train_config = build(TrainConfig, args, base={**PPO_DEFAULTS, "lr": PPO_LR[config.method]})
    summary = train_ppo(config, train_config, resume=args.resume)
    print(f"PPO ({config.method}) on {summary['prompts']} prompts, {summary['trainable_parameters']:,} trainable "
          f"parameters, {summary['steps']} steps ({summary['rollout_cycle_steps']} per batch of rollouts) in "
          f"{summary['seconds'] / 60:.1f} min")
    print_task_gain(summary)
    print(f"model: {summary['model']}")


def cmd_rm_score(argv: list[str]) -> None:
    """``lmforge rm score MODEL --input pairs.jsonl``: each pair's scores, and the accuracy."""
    from lmforge.data.preferences import read_preferences
    from lmforge.reward_model import score_pairs

    parser = argparse.ArgumentParser(prog="lmforge rm score",
                                     description="Score the chosen and rejected answer of every pair with a "
                                                 "reward model; print them and the share where chosen wins.")
    parser.add_argument("model", help="a reward model (`lmforge rm` writes OUT_DIR/model)")
    parser.add_argument("--input", required=True, help="preference pairs (.jsonl)")
    parser.add_argument("--output", help="write one JSON line per pair here instead of printing")
    args = parser.parse_args(argv)
    pairs, _ = read_preferences(args.input)
    scores = score_pairs(args.model, pairs)
    lines = [{"source": p.source, "chosen_score": c, "rejected_score": r, "chosen_wins": c > r}
             for p, (c, r) in zip(pairs, scores)]
    if args.output:
        write_text_atomic(args.output, "".join(json.dumps(line) + "\n" for line in lines))
    else:
        for line in lines:
            print(json.dumps(line))
    print(f"chosen scores higher in {sum(x['chosen_wins'] for x in lines)} of {len(lines)} pairs", file=sys.stderr)


def cmd_quantize(args: argparse.Namespace) -> None:
    from lmforge.quant.integer import QuantSpec
    from lmforge.quant.ptq import PLOT, REPORT, quantize_checkpoint

    activations = {"none": "static" if args.calibrate and args.method != "gptq" else "none", "int8": "group",
                   "int8-row": "dynamic", "int8-static": "static"}[args.activations]
    spec = QuantSpec(bits=args.bits, scheme=args.scheme, granularity=args.granularity, group_size=args.group_size,
                     activations=activations)
    text = None
    if args.eval_text:
        try:
            text = Path(args.eval_text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{args.eval_text}: cannot read the held-out text: {err}") from err
    report = quantize_checkpoint(args.model, args.out, spec, device=args.device, eval_chars=args.eval_chars,
                                 eval_text=text, calibrate=args.calibrate, eval_task=args.eval_task,
                                 eval_items=args.eval_items, method=args.method, act_order=args.act_order)
    print(report.table())
    print(f"\nwrote {args.out} ({report.seconds:.0f} s): {REPORT}, {PLOT}; load it like any checkpoint "
          f"(lmforge generate {args.out} ...)")


def cmd_generate(args: argparse.Namespace) -> None:
    from lmforge.api import load
    from lmforge.infer.sampling import SamplingConfig

    if (args.prompt is None) == (args.input is None):
        raise InputError("give a prompt, or --input prompts.jsonl (not both)")
    lm = load(args.checkpoint, device=args.device, dtype=args.dtype, compile=args.compile, weights=args.weights,
              compile_cpp=args.compile_cpp, **_speculative_options(args))
    if args.input is not None:
        _generate_jsonl(lm, args)
        return
    sampling = build(SamplingConfig, args)
    fields = {k: v for k, v in vars(sampling).items()}
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    echo = "" if lm.encoder_decoder else prompt  # a decoder continues the prompt; an encoder-decoder answers it
    try:
        if args.no_stream or sampling.num_beams > 1:
            print(echo + lm.generate(prompt, **fields))
            return
        print(echo, end="", flush=True)
        for piece in lm.stream(prompt, **fields):
            print(piece, end="", flush=True)
        print()
    except ValueError as err:  # a prompt too long for the model, and the like
        raise InputError(str(err)) from err
    finally:
        if lm.drafter is not None and lm.speculative_stats.passes:
            stats = lm.speculative_stats
            print(f"speculative: {stats.tokens} tokens in {stats.passes} passes ({stats.tokens_per_pass:.2f} a pass); "
                  f"{stats.accepted} of {stats.drafted} guesses kept ({stats.acceptance:.0%})", file=sys.stderr)


def cmd_inspect(args: argparse.Namespace) -> None:
    from lmforge.inspector import inspect_text, load_inspectable
    from lmforge.inspector.export import Focus, payload, write_html
    from lmforge.inspector.terminal import render

    text = sys.stdin.read() if args.text == "-" else args.text
    views = tuple(v.strip() for v in args.views.split(",") if v.strip()) if args.views else None
    if views is not None and (args.html or args.json):
        views = tuple(dict.fromkeys((*views, "attention", "query_keys")))  # the page's heat map needs them
    lm = load_inspectable(args.model, device=args.device, dtype=args.dtype)
    focus = Focus(layer=args.layer, head=args.head, stack=args.stack, position=args.position,
                  temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                  beams=args.beams, beam_tokens=args.beam_tokens, kv_steps=args.kv_steps)
    seen = inspect_text(lm, text, Path(str(args.model)).name, add_bos=not args.no_bos, target=args.target)
    data = payload(seen, focus, views)
    if not args.quiet:
        print(render(data))
    if args.json:
        from lmforge.files import write_json_atomic

        write_json_atomic(Path(args.json), data)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.html:
        print(f"wrote {write_html(data, args.html)} (opens in any browser, no server needed)", file=sys.stderr)


def cmd_inspect_stage(argv: list[str]) -> None:
    """``lmforge inspect lora|quant|reward|ratio|rag ...``: the other stages' views (lmforge.inspector)."""
    from lmforge import inspector
    from lmforge.inspector import plots, terminal

    stage = argv[0]
    parser = argparse.ArgumentParser(prog=f"lmforge inspect {stage}")
    if stage == "lora":
        parser.description = "A LoRA adapter beside the frozen weights it adapts: norms and singular values."
        parser.add_argument("base", help="the model the adapter was trained on (checkpoint, HF directory, .gguf, "
                                         "packaged name)")
        parser.add_argument("adapter", help="the adapter folder (OUT/adapter of `lmforge sft --method lora`)")
    elif stage == "quant":
        parser.description = "A model beside its quantized copy: per-layer error, one layer's weights and grid."
        parser.add_argument("original", help="the float model")
        parser.add_argument("quantized", help="the folder `lmforge quantize` wrote")
        parser.add_argument("--layer", help="the layer shown closely (default: the largest mean squared error)")
        parser.add_argument("--bins", type=int, default=64)
    elif stage in ("reward", "ratio"):
        parser.description = ("A reward model's score of a reply, token by token." if stage == "reward" else
                              "An aligned policy against its reference on one reply: log-probability ratios.")
        parser.add_argument("model", help="the reward model (`lmforge rm`)" if stage == "reward" else
                            "the policy (`lmforge dpo`, `grpo`, `ppo`)")
        if stage == "ratio":
            parser.add_argument("reference", help="the reference model (the one alignment started from)")
            parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta, for the implicit reward")
        parser.add_argument("--prompt", required=True, help="the user's message")
        parser.add_argument("--reply", required=True, help="the assistant's reply to score")
    elif stage == "rag":
        parser.description = "What retrieval hands the model: chunks, their scores under each method, their place."
        parser.add_argument("kb", help="a knowledge base folder (`lmforge rag index`)")
        parser.add_argument("question")
        parser.add_argument("-k", type=int, default=4, help="chunks in the prompt")
        parser.add_argument("--method", default="hybrid", choices=["bm25", "dense", "hybrid"])
        parser.add_argument("--model", help="also answer with this model (and place the chunks in its tokens)")
        parser.add_argument("--max-new-tokens", type=int, default=256)
    if stage in ("lora", "quant"):
        parser.add_argument("--plot", metavar="PNG", help="draw the view to this file")
    parser.add_argument("--json", metavar="FILE", help="write the view's data as JSON")
    args = parser.parse_args(argv[1:])
    if stage == "lora":
        view = inspector.lora_view(inspector.load_lora(args.base, args.adapter))
        text, draw = terminal.lora_table(view), plots.plot_lora
    elif stage == "quant":
        view = inspector.quant_view(args.original, args.quantized, args.layer, args.bins)
        text, draw = terminal.quant_table(view), plots.plot_quant
    elif stage in ("reward", "ratio"):
        from lmforge.checkpoint import load_tokenizer
        from lmforge.interop.packaged import resolve_model

        tokenizer = load_tokenizer(resolve_model(args.model))
        if stage == "reward":
            view = inspector.reward_view(args.model, tokenizer, args.prompt, args.reply)
            text = terminal.reward_table(view)
        else:
            view = inspector.policy_ratio_view(args.model, args.reference, tokenizer, args.prompt, args.reply,
                                               args.beta)
            text = terminal.ratio_table(view)
    else:
        from lmforge.api import load

        lm = load(args.model) if args.model else None
        view = inspector.rag_view(args.kb, args.question, args.k, lm, args.method,
                                  max_new_tokens=args.max_new_tokens)
        text = terminal.rag_table(view)
    print(text)
    if args.json:
        from lmforge.files import write_json_atomic

        write_json_atomic(Path(args.json), view.to_dict())
        print(f"wrote {args.json}", file=sys.stderr)
    if getattr(args, "plot", None):
        print(f"wrote {draw(view, args.plot)}", file=sys.stderr)


def _speculative_options(args: argparse.Namespace) -> dict:
    return {"draft": args.draft, "prompt_lookup": args.prompt_lookup, "draft_layers": args.draft_layers,
            "draft_tokens": args.draft_tokens}


def _add_speculative_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--draft", metavar="MODEL", help="speculative decoding: a smaller model with the same tokenizer "
                                                   "guesses tokens that this model checks in one pass (same output)")
    p.add_argument("--prompt-lookup", type=int, nargs="?", const=3, default=0, metavar="N",
                   help="speculative decoding that guesses from matches of the last N tokens (default 3) earlier "
                        "in the prompt and output: fast where the output repeats the input; with --draft or "
                        "--draft-layers, lookup guesses where it finds a match and the draft elsewhere")
    p.add_argument("--draft-layers", type=int, default=0, metavar="N",
                   help="speculative decoding with a self-draft: the model's own first N layers guess")
    p.add_argument("--draft-tokens", type=int, default=4, help="tokens guessed per pass (--draft, --draft-layers, "
                                                               "--prompt-lookup)")


def _generate_jsonl(lm, args: argparse.Namespace) -> None:
    """Each line of --input ({"prompt": ...} or {"messages": [...]}, plus its own sampling fields) through
    the batched engine; one JSON line per prompt, in order, to --output (default: standard output)."""
    import time

    from lmforge.infer.sampling import SamplingConfig
    from lmforge.tokenizer.chat import check_messages

    sampling = {name: value for name, value in vars(args).items()
                if name in SamplingConfig.__dataclass_fields__ and value is not None}
    path, items = Path(args.input), []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: invalid JSON: {err.msg}") from err
        if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
            raise InputError(f'{path}:{number}: expected {{"prompt": ...}} or {{"messages": [...]}}')
        items.append((number, record))
    start = time.perf_counter()
    for number, record in items:  # check every line before running any
        try:
            lm.sampling_config(**{**sampling, **{k: v for k, v in record.items() if k not in ("prompt", "messages")}})
        except (TypeError, ValueError) as err:
            raise InputError(f"{path}:{number}: {err}") from err
        if "messages" in record:
            check_messages(record["messages"], f"{path}:{number}: messages")
        elif not isinstance(record["prompt"], str):
            raise InputError(f"{path}:{number}: 'prompt' must be text, got {record['prompt']!r:.60}")
    try:
        results = lm.generate_batch([record for _, record in items], max_batch_size=args.batch_size, **sampling)
    except (ValueError, InputError) as err:  # a prompt longer than the context, a chat template's refusal
        raise InputError(f"{path}: {err}") from err
    rows = "".join(json.dumps({"line": number, **record, "completion": result.text,
                               "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                               "completion_tokens": result.completion_tokens}, ensure_ascii=False) + "\n"
                   for (number, record), result in zip(items, results))
    if args.output:
        write_text_atomic(args.output, rows)
    else:
        sys.stdout.write(rows)
    tokens = sum(r.completion_tokens for r in results)
    seconds = time.perf_counter() - start
    print(f"generated {tokens:,} tokens for {len(results)} prompts in {seconds:.1f} s "
          f"({tokens / max(seconds, 1e-9):,.0f} tokens/s, batches of up to {args.batch_size})", file=sys.stderr)
    stats = lm.engine(args.batch_size).stats
    if stats.drafted:
        print(f"speculative: {stats.accepted} of {stats.drafted} guesses kept ({stats.accepted / stats.drafted:.0%}), "
              f"{stats.decode_steps} decode passes", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> None:
    from lmforge.serve.server import ServeConfig, parse_model_specs, run_server

    run_server(parse_model_specs(args.model_path, args.model), build(ServeConfig, args), _speculative_options(args))


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.eval.run import EvalConfig, run_eval

    if args.list_tasks:
        from lmforge.eval.tasks_builtin import BUILTIN_TASKS, builtin_task

        for name in BUILTIN_TASKS:
            task = builtin_task(name)
            print(f"{name:14} {task.kind:16} {task.language}  {len(task.test)} test / {len(task.train)} train items")
        return
    config = build(EvalConfig, args)
    results = run_eval(config, args.model_path, speculative=_speculative_options(args))
    for task, strategies in results["tasks"].items():
        for label, entry in strategies.items():
            shown = ", ".join(f"{k} {v['value']:.4f}" + (f" ± {v['stderr']:.4f}" if v.get("stderr") == v.get("stderr")
                                                          and v.get("stderr") is not None else "")
                              for k, v in entry["metrics"].items() if isinstance(v["value"], float))
            print(f"{task} [{label}{', chat' if entry['chat_template'] else ''}] n={entry['n']}: {shown}")
    print(f"wrote {Path(config.out) / 'results.json'}, report.md and samples/"
          + (f"; added to {config.leaderboard}" if config.leaderboard else ""))


def cmd_agent(args: argparse.Namespace) -> None:
    from lmforge.agent.loop import AgentConfig
    from lmforge.agent.run import AgentSetup, run_agent

    if args.resume and args.question:
        raise InputError("give a question or --resume TRACE, not both")
    run_agent(build(AgentSetup, args), build(AgentConfig, args), args.model, args.question, trace=args.trace,
              resume=args.resume, quiet=args.quiet)


def cmd_human(argv: list[str]) -> None:
    """``lmforge eval human-items PROMPTS --model A=PATH [--model B=PATH] --out ITEMS``,
    ``lmforge eval human-report DB`` and ``lmforge eval human-export DB --out FILE``."""
    from lmforge.eval.human import (
        RatingStore,
        answer_items,
        export_preferences,
        format_report,
        human_report,
        read_prompts,
    )

    parser = argparse.ArgumentParser(prog=f"lmforge eval {argv[0]}")
    if argv[0] == "human-items":
        parser.description = ("Ask one or two models every prompt and write their answers side by side as "
                              "rating items, for `lmforge serve --ratings DB --rating-items ITEMS`.")
        parser.add_argument("prompts", help="a text file with one prompt per line, or JSONL with a 'prompt' field")
        parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH",
                            help="a model to ask (repeat for a second one)")
        parser.add_argument("--out", required=True, help="JSONL file of items to write")
        parser.add_argument("--max-new-tokens", type=int, default=256)
        parser.add_argument("--temperature", type=float, default=0.0)
        args = parser.parse_args(argv[1:])
        from lmforge.api import load
        from lmforge.serve.server import parse_model_specs

        lines = read_prompts(args.prompts)
        specs = parse_model_specs(None, args.model)
        try:
            count = answer_items(lines, {name: load(spec) for name, spec in specs.items()}, args.out,
                                 args.max_new_tokens, args.temperature)
        except ValueError as err:
            raise InputError(str(err)) from None
        print(f"wrote {count} items to {args.out}")
        return
    parser.add_argument("db", help="the SQLite file given to `lmforge serve --ratings`")
    if argv[0] == "human-report":
        parser.description = ("Per-criterion means with confidence intervals, win rates and inter-rater "
                              "agreement (Krippendorff's alpha) of the stored human ratings.")
        parser.add_argument("--out", help="also write the Markdown report here")
        parser.add_argument("--json", help="also write the report as JSON here")
        parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals")
    else:
        parser.description = "Pairs rated with a preference -> a preference data set (prompt, chosen, rejected)."
        parser.add_argument("--out", required=True, help="JSONL file to write")
        parser.add_argument("--majority", action="store_true",
                            help="one line per item with a strict majority (default: one line per rating)")
    args = parser.parse_args(argv[1:])
    if not Path(args.db).is_file():
        raise InputError(f"no ratings database at {args.db} (start `lmforge serve --ratings {args.db}`)")
    store = RatingStore(args.db)
    try:
        if argv[0] == "human-report":
            report = human_report(store, args.confidence)
            text = format_report(report)
            print(text)
            if args.out:
                write_text_atomic(args.out, text + "\n")
            if args.json:
                write_json_atomic(args.json, report)
        else:
            print(f"wrote {export_preferences(store, args.out, majority=args.majority)} preference pairs to {args.out}")
    finally:
        store.close()


def cmd_leaderboard(args: argparse.Namespace) -> None:
    from lmforge.eval import leaderboard

    if not Path(args.db).is_file():
        raise InputError(f"no leaderboard database at {args.db} (run `lmforge eval` first)")
    rows = leaderboard.latest(args.db)
    print(leaderboard.markdown(rows))
    md, page = leaderboard.write(args.db, args.out)
    print(f"wrote {md} and {page}")


def _listed(entries) -> int:
    """Print (name, what) pairs as two columns; exit code 0."""
    for name, what in entries:
        print(f"{name:20} {what}")
    return 0


def cmd_fuzz(args: argparse.Namespace) -> int:
    from lmforge.reliability.fuzz import format_table, fuzz_many
    from lmforge.reliability.targets import by_name

    targets = by_name(args.targets)
    if args.list:
        return _listed((t.name, t.what) for t in targets)
    if args.iterations is not None and args.iterations < 1 or args.seconds is not None and args.seconds <= 0:
        raise InputError("--iterations and --seconds must be positive")
    iterations = args.iterations if args.iterations is not None or args.seconds is not None else 200
    reports = fuzz_many(targets, iterations, args.seconds, args.seed, args.timeout, args.memory_gib,
                        Path(args.out) if args.out else None, progress=not args.json)
    if args.json:
        print(json.dumps([r.summary() for r in reports], indent=2))
    else:
        print(format_table(reports))
        if args.out and any(r.failures for r in reports):
            print(f"failing inputs saved in {args.out}")
    return 1 if any(r.failures for r in reports) else 0


def cmd_killtest(args: argparse.Namespace) -> int:
    import tempfile

    from tqdm.auto import tqdm

    from lmforge.reliability.kill import by_name, format_table, kill_writer

    writers = by_name(args.writers)
    if args.list:
        return _listed((w.name, w.what) for w in writers)
    if args.kills < 1:
        raise InputError("--kills must be at least 1")
    reports = []
    for writer in writers:
        with tempfile.TemporaryDirectory(prefix="lmforge-kill-") as folder, \
                tqdm(total=args.kills, desc=writer.name, unit="kill", disable=args.json, leave=False) as bar:
            reports.append(kill_writer(writer, Path(folder), args.kills, args.seed, on_kill=lambda _: bar.update(1)))
        if not args.json:  # each writer's line as it finishes (a long run shows what it has found so far)
            tqdm.write(format_table(reports[-1:]).splitlines()[2], file=sys.stderr)
    print(json.dumps([r.summary() for r in reports], indent=2) if args.json else format_table(reports))
    return 1 if any(r.problems for r in reports) else 0


def cmd_soak(args: argparse.Namespace) -> int:
    from lmforge.reliability.soak import soak

    if min(args.rounds, args.flood) < 1 or min(args.disconnects, args.slow) < 0:
        raise InputError("--rounds and --flood must be at least 1, --disconnects and --slow at least 0")
    report = soak(args.rounds, args.flood, args.disconnects, args.slow, args.max_queue, progress=not args.json)
    summary = report.summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:22} {value}")
    return 0 if report.ok else 1


def cmd_import(args: argparse.Namespace) -> None:
    from lmforge.interop.convert import import_model

    out = import_model(args.source, args.out)
    print(f"wrote lmforge checkpoint {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from lmforge.interop.convert import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, args.format, args.gguf_type)
    print(f"wrote {args.format} model {out}")


# -- parser -----------------------------------------------------------------------------------------------

def _answer_options(p: argparse.ArgumentParser, model_help: str, max_new_tokens: int) -> None:
    """The options rag ask and rag eval share: the answering model and how it is given the chunks."""
    p.add_argument("--model", help=model_help)
    p.add_argument("--base-url", help="answer through an OpenAI-compatible server (lmforge serve, llama.cpp, vLLM)")
    p.add_argument("--api-key", help="with --base-url: its API key")
    p.add_argument("-k", type=int, default=4, help="chunks given to the model")
    p.add_argument("--min-score", type=float, default=0.3,
                   help="the best chunk's cosine similarity below which the answer is 'not found'")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="longest answer")


def _retrieval_options(p: argparse.ArgumentParser, rerank: str, weights: bool = True) -> None:
    """The options rag search, ask and eval share: fusion weights, the reranking model, its device and dtype."""
    if weights:
        p.add_argument("--weights", type=float, nargs=2, default=[1.0, 1.0], metavar=("BM25", "DENSE"),
                       help="hybrid: each method's weight in the reciprocal rank fusion")
    p.add_argument("--rerank", metavar="MODEL", help=f"{rerank} by a language model's judgement (log P(yes) - "
                                                      "log P(no) that the chunk answers the question)")
    p.add_argument("--exact", action="store_true",
                   help="dense search reads every vector even where the knowledge base has an HNSW graph")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (the language models')")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp32 (the language models')")


def _report_flags(p: argparse.ArgumentParser, items: str, drawn: str) -> None:
    """--seed, --json and --list of lmforge fuzz and lmforge killtest."""
    p.add_argument("--seed", type=int, default=0, help=f"seed of the {drawn}")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--list", action="store_true", help=f"name the {items} and stop")


def make_parser() -> argparse.ArgumentParser:
    from lmforge.chat import HELP as CHAT_HELP
    from lmforge.data import DataConfig
    from lmforge.distill import DistillConfig
    from lmforge.dpo import DPOConfig
    from lmforge.eval.run import EvalConfig
    from lmforge.finetune import FinetuneConfig
    from lmforge.grpo import GRPOConfig
    from lmforge.infer.sampling import SamplingConfig
    from lmforge.interop.packaged import DEFAULT_CHAT_MODEL
    from lmforge.model import ModelConfig
    from lmforge.ppo import PPOConfig
    from lmforge.reward_model import RewardConfig
    from lmforge.serve.server import ServeConfig
    from lmforge.speedrun import SpeedrunConfig
    from lmforge.study.architectures import ArchitecturesConfig
    from lmforge.study.emergence import EmergenceConfig
    from lmforge.study.scaling import ScalingConfig
    from lmforge.train import TrainConfig

    parser = argparse.ArgumentParser(prog="lmforge", description="Make, understand and run a language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("speedrun", help="built-in corpus -> tokenizer -> pretraining -> report, in one go")
    add_arguments(p, SpeedrunConfig)
    p.set_defaults(func=cmd_speedrun)

    study = sub.add_parser("study", help="test the notes' claims on real runs").add_subparsers(dest="action",
                                                                                               required=True)
    p = study.add_parser("scaling", help="a ladder of model sizes and compute budgets; power-law, IsoFLOP and "
                                         "L(N, D) fits; a held-out run predicted before it trains")
    add_arguments(p, ScalingConfig)
    p.set_defaults(func=cmd_study_scaling)
    p = study.add_parser("emergence", help="the ladder trained on composite tasks: whole-task exact match "
                                           "against sub-task accuracy, p^k and log-likelihood")
    add_arguments(p, EmergenceConfig)
    p.set_defaults(func=cmd_study_emergence)
    p = study.add_parser("architectures", help="decoder, encoder and encoder-decoder at matched size and compute: "
                                               "zero-shot, few-shot and after multitask tuning")
    add_arguments(p, ArchitecturesConfig)
    p.set_defaults(func=cmd_study_architectures)

    data = sub.add_parser("data", help="prepare text and token shards").add_subparsers(dest="action", required=True)
    p = data.add_parser("prepare", help="clean, filter, deduplicate and split text inputs")
    p.add_argument("inputs", nargs="+", help="files, folders, globs, 'builtin' or hf:NAME[:SPLIT]")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(p, DataConfig)
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("shard", help="tokenize a prepared folder into packed token shards")
    p.add_argument("--data", required=True, help="prepared data folder (from `data prepare`)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the last speedrun's)")
    p.add_argument("--out", required=True, help="output folder for train.bin, val.bin, meta.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_shard)

    tok = sub.add_parser("tokenizer", help="train a tokenizer").add_subparsers(dest="action", required=True)
    p = tok.add_parser("train", help="train a byte-level BPE tokenizer on a prepared folder")
    p.add_argument("--data", required=True, help="prepared data folder (from `data prepare`)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size, special tokens included")
    p.add_argument("--out", required=True, help="output tokenizer.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("embed", help="sentence embeddings from an encoder (all-minilm-l6-v2, a BERT directory, "
                                     "or a checkpoint from pretrain --objective mlm)")
    p.add_argument("model", help="encoder: all-minilm-l6-v2, a BERT / sentence-transformers directory or a checkpoint")
    p.add_argument("texts", nargs="*", help="texts to embed")
    p.add_argument("--input", help="a file with one text per line")
    p.add_argument("--out", help="write the vectors here (.npy) instead of printing them")
    p.add_argument("--batch-size", type=int, default=32, help="texts encoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="fp32", help="fp32 (the reference vectors), bf16 or auto")
    p.set_defaults(func=cmd_embed)

    rag = sub.add_parser("rag", help="retrieval: index documents into a knowledge base, search it"
                         ).add_subparsers(dest="action", required=True)
    p = rag.add_parser("index", help="read, chunk and embed files into a knowledge base (again: update it)")
    p.add_argument("paths", nargs="+", help="files and folders: text, Markdown, HTML, PDF, source code, JSONL")
    p.add_argument("--out", required=True, help="the knowledge base folder (created, or updated in place)")
    p.add_argument("--encoder", default="all-minilm-l6-v2", help="embedding model: all-minilm-l6-v2, a BERT / "
                                                                 "sentence-transformers directory or an encoder checkpoint")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per chunk at most (the encoder's)")
    p.add_argument("--overlap", type=int, default=32, help="tokens a chunk repeats from the one before")
    p.add_argument("--batch-size", type=int, default=32, help="chunks embedded together")
    p.add_argument("--ann", default="auto", choices=["auto", "on", "off"],
                   help="an HNSW graph for approximate dense search (auto: from 50,000 chunks on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rag_index)
    p = rag.add_parser("search", help="the chunks of a knowledge base that best match a question")
    p.add_argument("kb", help="knowledge base folder (from rag index)")
    p.add_argument("query", help="the question")
    p.add_argument("-k", type=int, default=5, help="how many chunks")
    p.add_argument("--method", default="hybrid", choices=["bm25", "dense", "hybrid"],
                   help="bm25 (keywords), dense (embeddings) or hybrid (both, reciprocal rank fusion)")
    p.add_argument("--width", type=int, default=160, help="characters of each chunk to show")
    _retrieval_options(p, "reorder the best 20 chunks")
    p.set_defaults(func=cmd_rag_search)
    p = rag.add_parser("ask", help="answer a question from a knowledge base, citing its sources")
    p.add_argument("kb", help="knowledge base folder (from rag index)")
    p.add_argument("question", help="the question")
    _answer_options(p, "the answering model: checkpoint, HF directory, .gguf or packaged name (default "
                       "smollm2-135m-instruct), or with --base-url the served model's name", max_new_tokens=256)
    p.add_argument("--method", default="hybrid", choices=["bm25", "dense", "hybrid"], help="retrieval method")
    _retrieval_options(p, "reorder the best 20 chunks", weights=False)
    p.set_defaults(func=cmd_rag_ask)
    p = rag.add_parser("eval", help="recall@k, MRR and nDCG@10 of each retriever on questions with known sources")
    p.add_argument("kb", help="knowledge base folder (from rag index)")
    p.add_argument("questions", nargs="?", help='JSONL: {"question": ..., "sources": [chunk id, source or file], '
                                               '"answer": ...} per line, or langref (the built-in set over the '
                                               "language reference; default: questions drawn from the knowledge base)")
    p.add_argument("--methods", nargs="+", default=["bm25", "dense", "hybrid"], choices=["bm25", "dense", "hybrid"])
    p.add_argument("--count", type=int, default=100, help="questions drawn when no file is given")
    p.add_argument("--seed", type=int, default=0, help="which chunks the drawn questions come from")
    p.add_argument("--out", help="also write the figures (and with a model, every reply) here (JSON)")
    _answer_options(p, "also answer every question with this model (hybrid retrieval) and score the replies: "
                       "exact match, F1, contains, cited, claims supported (the questions need 'answer')",
                    max_new_tokens=128)
    p.add_argument("--judge", metavar="MODEL", help="a language model judges whether the cited chunks support "
                                                    "each claim (default: the claim's word coverage)")
    _retrieval_options(p, "also score hybrid+rerank: the best 20 chunks reordered")
    p.set_defaults(func=cmd_rag_eval)
    p = rag.add_parser("langref", help="write the Python language reference as Markdown files, one per topic "
                                       "(the documents of the built-in question set 'langref')")
    p.add_argument("out", help="folder to write")
    p.set_defaults(func=cmd_rag_langref)
    p = rag.add_parser("train-retriever", help="train a dense retriever (dual encoder, in-batch negatives) on "
                                               "question-passage pairs drawn from a knowledge base")
    p.add_argument("kb", help="knowledge base folder (from rag index)")
    p.add_argument("--out", required=True, help="folder for the trained encoder (OUT/checkpoint) and its report")
    p.add_argument("--encoder", default="all-minilm-l6-v2", help="the encoder to start from (e.g. a checkpoint of "
                                                                 "pretrain --objective mlm)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per batch (each question's negatives: the rest)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate")
    p.add_argument("--questions-per-chunk", type=int, default=2, help="questions drawn from each chunk")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature of the similarities")
    p.add_argument("--seed", type=int, default=0, help="which chunks train and which measure")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_rag_train_retriever)

    p = sub.add_parser("tokenize", help="show the tokens of a text, their ids and the count")
    p.add_argument("text", help="the text ('-' reads standard input)")
    p.add_argument("--tokenizer", help="tokenizer.json or a checkpoint folder (default: the last speedrun's)")
    p.add_argument("--ids", action="store_true", help="print only the ids")
    p.set_defaults(func=cmd_tokenize)

    model = sub.add_parser("model", help="inspect model shapes").add_subparsers(dest="action", required=True)
    p = model.add_parser("info", help="parameters and FLOPs per token of a preset, config or checkpoint")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint folder (instead of a preset)")
    p.add_argument("--preset", default="cpu-small", help="named model shape")
    p.add_argument("--model-config", help="JSON file of ModelConfig fields")
    p.add_argument("--list", action="store_true", help="list every preset")
    add_arguments(p, ModelConfig)
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("pretrain", help="pretraining on token shards: next-token (a decoder), masked-token "
                                        "(an encoder, --objective mlm) or span corruption (an encoder-decoder, "
                                        "--objective span)")
    p.add_argument("--shards", required=True, help="folder from `data shard`")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the last speedrun's)")
    p.add_argument("--qat", choices=["int8", "int4"], help="quantization-aware training: the forward pass uses "
                   "the quantized weights (int8 per channel, or int4 with a zero point per group of 32), the float "
                   "ones learn; then OUT_DIR/quantized is written")
    p.add_argument("--objective", choices=["clm", "mlm", "span"], default="clm",
                   help="clm: next-token prediction (a decoder); mlm: masked-token prediction, BERT's 15%% of "
                        "positions, 80/10/10 masked/random/kept (an encoder); span: T5's span corruption, hidden "
                        "runs replaced by sentinels that the decoder writes out (an encoder-decoder)")
    p.add_argument("--noise-density", type=float, default=0.15, help="--objective span: share of tokens hidden")
    p.add_argument("--mean-span-length", type=float, default=3.0,
                   help="--objective span: mean length of a hidden run")
    p.add_argument("--nsp", action="store_true", help="with --objective mlm: also next-sentence prediction "
                                                      "(sentence pairs, the mlm+nsp head)")
    p.add_argument("--preset", default=None, help="named model shape (default: cpu-small; bert-small with "
                                                  "--objective mlm; t5-small with --objective span)")
    p.add_argument("--model-config", help="JSON file of ModelConfig fields")
    p.add_argument("--train-config", help="JSON file of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    p.add_argument("--init-from", help="start from this model's weights instead of a preset (checkpoint, HF "
                                       "directory, .gguf, packaged name); its tokenizer must be the shards'")
    add_arguments(p, ModelConfig, skip=("vocab_size",))
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("quantize", help="post-training quantization: int8 or int4 weights, with an error report")
    p.add_argument("model", help="checkpoint, HF directory, .gguf or packaged name")
    p.add_argument("--out", required=True, help="the quantized checkpoint's folder")
    p.add_argument("--bits", type=int, default=8, choices=[8, 4])
    p.add_argument("--scheme", default="symmetric", choices=["symmetric", "asymmetric"],
                   help="symmetric: absmax, q = round(w / scale); asymmetric: a zero point maps [min, max]")
    p.add_argument("--granularity", default="channel", choices=["tensor", "channel", "group"],
                   help="one scale per tensor, per output channel, or per group of --group-size inputs")
    p.add_argument("--group-size", type=int, default=128, help="inputs per scale with --granularity group")
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq"], help="rtn: each weight rounded to nearest; "
                   "gptq: column by column, later columns absorbing each rounding error as the inputs seen on "
                   "--calibrate DATA say (the blocks' layers; the table and head to nearest)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="gptq: round the columns whose inputs are largest first (--no-act-order: left to right)")
    p.add_argument("--activations", default="none", choices=["none", "int8", "int8-row", "int8-static"],
                   help="W8A8: round each layer's inputs to int8 too, every 32 inputs by their own absmax (int8, "
                        "as llama.cpp's q8_0), each row by its own (int8-row) or by scales calibrated once "
                        "(int8-static, with --calibrate)")
    p.add_argument("--calibrate", metavar="DATA", help="text or JSONL (\"text\" field) whose activations set the "
                                                       "static int8 scales (implies --activations int8-static, "
                                                       "except with --method gptq, which reads it for its inputs)")
    p.add_argument("--eval-chars", type=int, default=20000,
                   help="characters of the language reference for bits per byte before and after (0: skip)")
    p.add_argument("--eval-text", help="a text file to measure bits per byte on instead")
    p.add_argument("--eval-task", default="pyref_mc", help="a built-in multiple-choice task of lmforge eval "
                                                           "whose held-out accuracy is reported before and after")
    p.add_argument("--eval-items", type=int, default=100, help="items of --eval-task (0: skip)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("checkpoint", help="checkpoint folder, Hugging Face model directory, .gguf file, "
                                      "or smollm2-135m-instruct")
    p.add_argument("prompt", nargs="?", help="the prompt ('-' reads standard input)")
    p.add_argument("--input", help='JSONL file, one {"prompt": ...} or {"messages": [...]} per line (each may '
                                   "carry its own sampling fields): decoded together by the batched engine")
    p.add_argument("--output", help="with --input: write the JSONL results here (default: standard output)")
    p.add_argument("--batch-size", type=int, default=8, help="with --input: prompts decoded together")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp32")
    p.add_argument("--no-stream", action="store_true", help="print the whole text at the end")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step: faster per token, after a compilation of tens of seconds")
    p.add_argument("--compile-cpp", action="store_true", help=COMPILE_CPP_HELP)
    p.add_argument("--weights", default="fp32", choices=["fp32", "fp16", "bf16"], help=WEIGHTS_HELP)
    _add_speculative_options(p)
    add_arguments(p, SamplingConfig)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="look inside a model on a text: tokens, attention, the next-token "
                                       "distribution under sampler settings, the logit lens, the KV cache",
                       description="Runs the model once over the text and shows each view; --html writes the Inspect "
                                   "page with this inspection inside (opens with no server). The other stages: "
                                   "`lmforge inspect lora|quant|reward|ratio|rag --help`.")
    p.add_argument("model", help="checkpoint folder, Hugging Face model directory, .gguf file, or "
                                 "smollm2-135m-instruct")
    p.add_argument("text", help="the text ('-' reads standard input)")
    p.add_argument("--views", help="comma-separated views to compute and show (default: all): "
                                   "tokens, attention, query_keys, next, lens, residual, kv")
    p.add_argument("--layer", type=int, default=0, help="the layer whose attention is drawn")
    p.add_argument("--head", type=int, default=0, help="the head whose attention is drawn")
    p.add_argument("--stack", default="self", choices=["self", "cross", "encoder"],
                   help="an encoder-decoder's attention drawn: the decoder's own, its cross-attention over the "
                        "source, or the encoder's")
    p.add_argument("--target", help="an encoder-decoder: the text its decoder reads after its start token "
                                    "(default: its own greedy reply to the text)")
    p.add_argument("--position", type=int, default=None,
                   help="the token looked at closely: its attention row and the distribution of the token after "
                        "it (default: the last; negative counts from the end)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampler view: 0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sampler view: keep the k likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampler view: keep the nucleus of mass p (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="sampler view: 1 is off")
    p.add_argument("--seed", type=int, default=0, help="sampler view: the seed of the one draw shown")
    p.add_argument("--beams", type=int, default=4, help="beam search's width in the sampler view")
    p.add_argument("--beam-tokens", type=int, default=8, help="tokens greedy and beam search write in the view")
    p.add_argument("--kv-steps", type=int, default=16, help="tokens decoded to show the KV cache growing")
    p.add_argument("--no-bos", action="store_true", help="read the text without the tokenizer's BOS token")
    p.add_argument("--html", metavar="FILE", help="write the Inspect page with this inspection (one file)")
    p.add_argument("--json", metavar="FILE", help="write the inspection's data as JSON")
    p.add_argument("--quiet", action="store_true", help="print nothing but where files went")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp32")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("chat", help="talk with a chat model in the terminal (streaming, multi-turn)",
                       description="Sampling defaults for chat: "
                                   + ", ".join(f"{k}={v}" for k, v in CHAT_SAMPLING.items()) + ". " + CHAT_HELP)
    p.add_argument("model", nargs="?", default=DEFAULT_CHAT_MODEL,
                   help=f"checkpoint, HF directory, .gguf or packaged name (default: {DEFAULT_CHAT_MODEL})")
    p.add_argument("--system", default="", help="system prompt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp32")
    p.add_argument("--compile", action="store_true", help="compile the decode step (faster after a warm-up)")
    p.add_argument("--compile-cpp", action="store_true", help=COMPILE_CPP_HELP)
    p.add_argument("--weights", default="fp32", choices=["fp32", "fp16", "bf16"], help=WEIGHTS_HELP)
    _add_speculative_options(p)
    add_arguments(p, SamplingConfig)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("sft", help="instruction fine-tuning (full, LoRA or QLoRA) with the loss on answers only",
                       description="Fine-tune a model on conversations. Training flags default for fine-tuning: "
                                   + ", ".join(f"{k}={v}" for k, v in SFT_DEFAULTS.items())
                                   + ", lr=2e-5 (full) or 1e-3 (lora, qlora).")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, FinetuneConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("distill", help="distill a small draft model for speculative decoding from the model it "
                                       "drafts for", description="The teacher answers prompts; a small student "
                       "learns its answers and its next-token distributions (train/distill.py); OUT_DIR/model is "
                       "then a --draft for the teacher. Training flags default to " + ", ".join(
                           f"{k}={v}" for k, v in DISTILL_DEFAULTS.items()) + ". See docs/QUANTIZATION.md.")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, DistillConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("rm", help="train a reward model on preference pairs (Bradley-Terry); `rm score` scores pairs",
                       description="Train a reward model: a language model's backbone with a scalar head, on "
                                   "preference pairs, with the pairwise loss; held-out pair accuracy before and "
                                   "after. `lmforge rm score MODEL --input pairs.jsonl` scores pairs.")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, RewardConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("dpo", help="align a chat model on preference pairs (DPO, IPO, conservative DPO, SimPO)",
                       description="Direct preference optimization against a frozen reference (with LoRA: the "
                                   "same weights with the adapters off). Logs TRL's rewards/* and logps/* figures; "
                                   "measures held-out task accuracy before and after on the built-in pairs. "
                                   "Training flags default as for sft, with lr "
                                   + ", ".join(f"{k} {v}" for k, v in DPO_LR.items()) + ". See docs/ALIGN.md.")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, DPOConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("grpo", help="reinforcement learning with verifiable rewards (GRPO) on the batched engine",
                       description="Sample a group of answers per prompt with the batched engine, reward each (the "
                                   "built-in tasks' checker, or FILE.py:FUNCTION), and raise the probability of the "
                                   "answers that beat their group. --batch-size is prompts per step. Defaults: "
                                   + ", ".join(f"{k}={v}" for k, v in GRPO_DEFAULTS.items() if k != "out_dir")
                                   + ", lr " + ", ".join(f"{k} {v}" for k, v in GRPO_LR.items())
                                   + ". See docs/ALIGN.md.")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, GRPOConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("ppo", help="RLHF with PPO: a value head, a KL penalty to the reference, GAE, clipped losses",
                       description="Sample one answer per prompt with the batched engine, score it (a reward model, "
                                   "the built-in tasks' checker, or FILE.py:FUNCTION), pay a per-token KL penalty to "
                                   "the reference, and improve the policy and its value head with PPO's clipped "
                                   "losses over --ppo-epochs passes. --batch-size is answers per optimizer step. "
                                   "Defaults: " + ", ".join(f"{k}={v}" for k, v in PPO_DEFAULTS.items() if k != "out_dir")
                                   + ", lr " + ", ".join(f"{k} {v}" for k, v in PPO_LR.items())
                                   + ". See docs/ALIGN.md.")
    p.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint")
    add_arguments(p, PPOConfig)
    add_arguments(p, TrainConfig)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web UI and Prometheus metrics",
                       description="Serve models behind /v1/chat/completions, /v1/completions, /v1/embeddings, "
                                   "/v1/models, /health and /metrics, with a chat UI at /. Many requests are "
                                   "decoded together (continuous batching). See docs/SERVING.md.")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help=f"checkpoint, HF directory, .gguf or packaged name (default: {DEFAULT_CHAT_MODEL})")
    p.add_argument("--model", action="append", metavar="NAME=PATH",
                   help="serve another model under NAME (repeatable); clients pick it with 'model': NAME")
    add_arguments(p, ServeConfig)
    _add_speculative_options(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("eval", help="score a model on tasks (multiple choice, generation, perplexity) "
                                    "under several prompting strategies",
                       description="Evaluate a model (anything lmforge loads, or --base-url for an OpenAI-"
                                   "compatible server) and write results.json, report.md and per-sample logs; "
                                   "each run joins the leaderboard. Human ratings: `lmforge eval human-items PROMPTS --model A=PATH "
                                   "--model B=PATH --out items.jsonl`, `lmforge eval human-report DB` "
                                   "and `lmforge eval human-export DB --out prefs.jsonl`. See docs/EVALUATION.md.")
    p.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                   help=f"checkpoint, HF directory, .gguf or packaged name (default: {DEFAULT_CHAT_MODEL}); "
                        "with --base-url: the server's model name (default: its first)")
    p.add_argument("--list-tasks", action="store_true", help="list the built-in tasks and exit")
    add_arguments(p, EvalConfig)
    _add_speculative_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("agent", help="a model that calls tools (calculator, sandboxed Python, files, search) "
                                     "step by step until it answers",
                       description="Answer a question with tools: the model thinks, calls a tool, reads the result, "
                                   "... then answers, within step, time and token budgets. Without a question, "
                                   "asks for questions until an empty line. Every run can write a JSONL trace "
                                   "(--trace) and be resumed from it (--resume). See docs/AGENTS.md.")
    p.add_argument("question", nargs="?", default=None, help="the question (omit for an interactive session)")
    p.add_argument("--model", default=None, help="checkpoint, HF directory, .gguf or packaged name (default: "
                                                 "smollm2-135m-instruct); with --base-url: the server's model name")
    p.add_argument("--trace", default=None, help="write the run's steps here as JSON lines")
    p.add_argument("--resume", default=None, metavar="TRACE", help="continue the stopped run this trace records")
    p.add_argument("--quiet", action="store_true", help="print only the answer and the summary line")
    from lmforge.agent.loop import AgentConfig
    from lmforge.agent.run import AgentSetup

    add_arguments(p, AgentSetup)
    add_arguments(p, AgentConfig)
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("leaderboard", help="the scores of every evaluation run, as tables and a static page")
    p.add_argument("--db", default="runs/leaderboard.sqlite", help="the database `lmforge eval` writes")
    p.add_argument("--out", default="runs/leaderboard", help="folder for leaderboard.md and leaderboard.html")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("fuzz", help="damage the input of every reader again and again: each must answer or refuse "
                                    "with a clear error (docs/RELIABILITY.md)")
    p.add_argument("targets", nargs="*", help="readers to fuzz (default: all; --list names them)")
    p.add_argument("--iterations", type=int, default=None, help="damaged inputs per reader (default: 200)")
    p.add_argument("--seconds", type=float, default=None, help="or: seconds per reader")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds one read may take before it counts as a hang")
    p.add_argument("--memory-gib", type=float, default=4.0, help="address space a read may add before it counts "
                                                                  "as unbounded (0: no limit)")
    p.add_argument("--out", default=None, help="folder to save the inputs that failed, to replay them")
    _report_flags(p, "readers", "damage (the same seed, the same inputs)")
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("killtest", help="kill each writer (SIGKILL) at random moments: the last good output must "
                                        "read, a rerun or --resume must give what an uninterrupted run gives")
    p.add_argument("writers", nargs="*", help="writers to kill (default: all; --list names them)")
    p.add_argument("--kills", type=int, default=20, help="kills per writer")
    _report_flags(p, "writers", "kill times")
    p.set_defaults(func=cmd_killtest)

    p = sub.add_parser("soak", help="the server under faults: floods, clients that disconnect, slow bodies; "
                                    "everyone answered, everything freed, memory back where it was")
    p.add_argument("--rounds", type=int, default=5, help="rounds of faults")
    p.add_argument("--flood", type=int, default=1000, help="requests sent at once per round")
    p.add_argument("--disconnects", type=int, default=100, help="streams dropped after their first event, per round")
    p.add_argument("--slow", type=int, default=20, help="bodies sent a byte at a time, per round")
    p.add_argument("--max-queue", type=int, default=64, help="the server's --max-queue (past it: 429)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_soak)

    p = sub.add_parser("import", help="a Hugging Face model directory or GGUF file -> lmforge checkpoint")
    p.add_argument("source", help="HF folder (Llama, Mistral, Qwen2, GPT-2), a .gguf file (Llama, Qwen2), "
                                  "or smollm2-135m-instruct")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="an lmforge checkpoint -> a Hugging Face model directory or a GGUF file")
    p.add_argument("checkpoint", help="checkpoint folder (or any model lmforge reads)")
    p.add_argument("out", help="folder (hf) or file (gguf) to write")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"],
                   help="hf: transformers/vLLM directory (Llama or GPT-2 layout); gguf: llama.cpp/ollama file")
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="how GGUF stores the matrices (q8_0, q4_0: 8- or 4-bit blocks with one scale per 32 weights)")
    p.set_defaults(func=cmd_export)
    return parser


# `lmforge COMMAND ACTION ...` whose command also takes a positional MODEL: the action is read first,
# and the rest of the line goes to the action's own parser.
ACTIONS = {("eval", "human-items"): lambda argv: cmd_human(argv[1:]),
           ("eval", "human-report"): lambda argv: cmd_human(argv[1:]),
           ("eval", "human-export"): lambda argv: cmd_human(argv[1:]),
           ("rm", "score"): lambda argv: cmd_rm_score(argv[2:]),
           **{("inspect", stage): lambda argv: cmd_inspect_stage(argv[1:])
              for stage in ("lora", "quant", "reward", "ratio", "rag")}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    action = ACTIONS.get(tuple(argv[:2]))
    args = None if action else make_parser().parse_args(argv)
    try:
        code = action(argv) if action else args.func(args)
    except InputError as err:
        print(f"lmforge: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the disk or the folder refused (full, read-only, not allowed) outside a held folder
        if write_failure(err) is None:
            raise
        print(f"lmforge: error: {err.filename or 'a file'}: {write_failure(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code if isinstance(code, int) else 0  # a command may return its exit code (lmforge fuzz: 1 on failures)


if __name__ == "__main__":
    sys.exit(main())

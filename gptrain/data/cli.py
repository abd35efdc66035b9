"""`gptrain data`: download, prepare, finalize, stats, show.

    gptrain data download --out RAW_DIR                  books from gutenberg.org or a mirror
    gptrain data prepare --input RAW_DIR --out DATASET   clean + tokenize (one job-array task)
    gptrain data finalize DATASET                        merge task manifests, verify shards
    gptrain data stats DATASET                           books, tokens, shards, fingerprint
    gptrain data show DATASET --doc BOOK_ID              one book's text as the model sees it
"""

from __future__ import annotations

import argparse

from gptrain.data import download
from gptrain.data.clean import FOOTNOTE_MODES, CleanOptions
from gptrain.data.dedup import DedupOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser(
        "data",
        help="download, prepare and inspect Project Gutenberg datasets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    download.register(commands)

    prepare = commands.add_parser(
        "prepare",
        help="clean and tokenize RAW_DIR's books into DATASET's shards (one job-array task)",
        description="Clean and tokenize books into binary token shards. Task i of n (--task-index/--num-tasks, "
        "or the Slurm/Kubernetes array environment) takes the books whose id mod n is i; the last task "
        "to finish writes DATASET/manifest.json.",
    )
    prepare.add_argument("--input", required=True, metavar="RAW_DIR", help="folder or fsspec URL from `data download`")
    prepare.add_argument("--out", required=True, metavar="DATASET", help="output folder or fsspec URL (s3://...)")
    prepare.add_argument("--tokenizer", default="gpt2",
                         help="'gpt2' or a Llama 3 tokenizer.model file (default: %(default)s)")
    prepare.add_argument("--val-fraction", type=float, default=0.1,
                         help="share of books in the validation split (default: %(default)s)")
    prepare.add_argument("--split-seed", type=int, default=0, help="seed of the book split (default: %(default)s)")
    prepare.add_argument("--shard-tokens", type=int, default=100_000_000,
                         help="tokens per shard (default: %(default)s)")
    prepare.add_argument("--languages", default="en",
                         help="keep books whose catalog languages include one of these (comma-separated); "
                         "'any' skips the catalog test (default: %(default)s)")
    prepare.add_argument("--min-ascii-fraction", type=float, default=0.9,
                         help="keep books whose share of ASCII characters is above this; 0 turns the test off "
                         "(default: %(default)s)")
    prepare.add_argument("--workers", type=int,
                         help="tokenizer processes (default: the CPUs this process may use)")
    prepare.add_argument("--task-index", type=int,
                         help="this task's index in a job array (default: SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX)")
    prepare.add_argument("--num-tasks", type=int,
                         help="tasks in the job array (default: GPTRAIN_NUM_TASKS, or a whole Slurm array's count)")
    prepare.add_argument("--no-finalize", action="store_true",
                         help="do not write DATASET/manifest.json even when every task has finished")
    prepare.add_argument("--overwrite", action="store_true",
                         help="replace a dataset in DATASET prepared from other books or with other settings "
                         "(refused without it)")
    cleaning = prepare.add_argument_group("cleaning (recorded in the manifest; `gptrain data show` shows the result)")
    cleaning.add_argument("--no-unwrap", action="store_true",
                          help="keep the hard line wraps instead of joining each prose paragraph into one line")
    cleaning.add_argument("--keep-artifacts", action="store_true",
                          help="keep [Illustration] tags, page numbers, footnotes and the _ emphasis marks")
    cleaning.add_argument("--footnotes", choices=FOOTNOTE_MODES, default=CleanOptions.footnotes,
                          help="drop [Footnote ...] blocks, note markers and note paragraphs, or keep them "
                          "(default: %(default)s)")
    dedup = prepare.add_argument_group("near-duplicate editions (MinHash + LSH, resolved at finalize)")
    dedup.add_argument("--no-dedup", action="store_true", help="keep every edition of a work")
    dedup.add_argument("--dedup-threshold", type=float, default=DedupOptions.threshold,
                       help="drop a book when this estimated share of its 5-word shingles is in a kept book "
                       "(default: %(default)s)")
    prepare.set_defaults(func=run_prepare_command)

    finalize = commands.add_parser(
        "finalize", help="merge the task manifests into DATASET/manifest.json, verifying every shard"
    )
    finalize.add_argument("dataset", metavar="DATASET", help="dataset folder or fsspec URL")
    finalize.add_argument("--num-tasks", type=int, help="which run's tasks, when DATASET/tasks holds several")
    finalize.set_defaults(func=run_finalize_command)

    stats = commands.add_parser("stats", help="print a dataset's books, tokens, shards and fingerprint")
    stats.add_argument("dataset", metavar="DATASET", help="dataset folder or fsspec URL")
    stats.set_defaults(func=run_stats_command)

    show = commands.add_parser("show", help="print one book's text as the model sees it (decoded from the shards)")
    show.add_argument("dataset", metavar="DATASET", help="dataset folder or fsspec URL")
    show.add_argument("--doc", type=int, required=True, metavar="BOOK_ID", help="Project Gutenberg book id")
    show.set_defaults(func=run_show_command)


def run_prepare_command(args: argparse.Namespace) -> int:
    from gptrain.data.catalog import parse_languages
    from gptrain.data.prepare import PrepareConfig, run_prepare

    config = PrepareConfig(
        input=args.input,
        out=args.out,
        tokenizer=args.tokenizer,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        shard_tokens=args.shard_tokens,
        languages=() if args.languages.strip().lower() == "any" else parse_languages(args.languages),
        min_ascii_fraction=args.min_ascii_fraction,
        workers=args.workers,
        task_index=args.task_index,
        num_tasks=args.num_tasks,
        finalize=not args.no_finalize,
        clean=CleanOptions(unwrap=not args.no_unwrap, artifacts=not args.keep_artifacts, footnotes=args.footnotes),
        dedup=DedupOptions(enabled=not args.no_dedup, threshold=args.dedup_threshold),
        overwrite=args.overwrite,
    )
    run_prepare(config)
    return 0


def run_finalize_command(args: argparse.Namespace) -> int:
    from gptrain.data.manifest import finalize, manifest_url

    manifest = finalize(args.dataset, args.num_tasks)
    print(f"wrote {manifest_url(args.dataset)} (fingerprint {manifest['fingerprint']})")
    return 0


def run_stats_command(args: argparse.Namespace) -> int:
    from gptrain.data.manifest import load_manifest

    manifest = load_manifest(args.dataset)
    splits = manifest["splits"]
    kept, dropped = len(manifest["documents"]), len(manifest["dropped"])
    print(f"dataset      {args.dataset}")
    print(f"fingerprint  {manifest['fingerprint']}")
    print(f"tokenizer    {manifest['tokenizer'].get('name', '?')} (vocab {manifest['vocab_size']}, "
          f"{manifest['token_dtype']} tokens)")
    print(f"books        {kept} kept, {dropped} dropped, {kept + dropped} read")
    cleaning = manifest["params"]["cleaning"]
    footnotes = "dropped" if cleaning["footnotes"] == "drop" else "kept"
    artifacts = f"removed, footnotes {footnotes}" if cleaning["artifacts"] else "kept"
    print(f"cleaning     paragraphs {'unwrapped' if cleaning['unwrap'] else 'as wrapped'}, artifacts {artifacts}")
    dedup = manifest["params"]["dedup"]
    print(f"dedup        {len(manifest['duplicates'])} duplicate editions dropped (threshold {dedup['threshold']})"
          if dedup["enabled"] else "dedup        off")
    for name, split in splits.items():
        size = sum(s["bytes"] for s in split["shards"])
        shards = len(split["shards"])
        print(f"{name:<12} {split['documents']} books, {split['tokens']:,} tokens, "
              f"{shards} shard{'' if shards == 1 else 's'} ({size / 1e6:.1f} MB)")
    print(f"tokens       {sum(s['tokens'] for s in splits.values()):,}")
    print(f"shards       {sum(len(s['shards']) for s in splits.values())}")
    print(f"tasks        {manifest['num_tasks']}")
    return 0


def run_show_command(args: argparse.Namespace) -> int:
    from gptrain.data.loader import TokenDataset
    from gptrain.tokenizer import tokenizer_from_spec

    dataset = TokenDataset(args.dataset)
    tokenizer = tokenizer_from_spec(dataset.tokenizer_spec)
    print(tokenizer.decode(dataset.document_tokens(args.doc).tolist()))
    return 0

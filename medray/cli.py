"""`medray` command line: train, cv, tune, evaluate, predict, generate, serve, submit, jobs, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys

from medray.errors import MedrayError
from medray.tasks import TASKS


def _train(args) -> int:
    tracked = _mlflow_options(args)  # fails at once when --mlflow is given without MLflow installed
    if tracked and args.task == "genomic-gan":
        raise MedrayError("--mlflow tracks the classifiers (exercise, ultrasound, genomic), not genomic-gan yet")
    if args.task == "genomic-gan":
        from medray.gan import train_gan

        given = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size), ("lr", args.lr),
                                   ("n_critic", args.n_critic)) if v is not None}
        meta = train_gan(args.data, args.out, workers=args.workers, gpu=args.gpu, storage=args.storage, name=args.name,
                  seed=args.seed, conditional=args.conditional, max_failures=args.max_failures, address=args.address,
                  skip_bad=args.skip_bad, **given)
        return _log_into_run(meta)
    if args.conditional is not None or args.n_critic is not None:
        raise MedrayError("--conditional and --n-critic are for genomic-gan")
    from medray.train import train

    meta = train(args.task, args.data, args.out, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
          lr=args.lr, workers=args.workers, gpu=args.gpu, storage=args.storage, name=args.name, seed=args.seed,
          val_fraction=args.val_fraction, group_column=args.group_column, label_column=args.label_column,
          max_failures=args.max_failures, address=args.address, skip_bad=args.skip_bad,
          exclude_train=args.exclude_train, **tracked)
    return _log_into_run(meta)


def _mlflow_options(args) -> dict:
    """--mlflow / --mlflow-experiment as train()'s and cross_validate()'s options (medray/tracking.py)."""
    if not args.mlflow:
        return {}
    from medray.tracking import require_mlflow

    require_mlflow()
    return {"mlflow": args.mlflow, "mlflow_experiment": args.mlflow_experiment}


def _log_into_run(meta: dict) -> int:
    """`medray train`'s log file ends up in its run directory, beside the checkpoints."""
    from medray import console

    run = meta["training"]
    console.move_log(f"{run['storage_path']}/{run['run_name']}")
    if console.log_path():
        console.say(f"[medray] log: {console.log_path()}")
    return 0


def _cv(args) -> int:
    tracked = _mlflow_options(args)
    from medray import console
    from medray.cv import cross_validate, format_summary

    console.set_mode(epoch_lines=False)  # plain output: a line per fold, not per epoch

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        raise MedrayError(f"--seeds: comma-separated integers expected, got {args.seeds!r}") from None
    result = cross_validate(args.task, args.data, folds=args.folds, seeds=seeds, out=args.out, model=args.model,
                            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, workers=args.workers,
                            gpu=args.gpu, storage=args.storage, group_column=args.group_column,
                            label_column=args.label_column, max_failures=args.max_failures, address=args.address,
                            skip_bad=args.skip_bad, exclude_train=args.exclude_train, **tracked)
    if args.out:
        console.move_log(args.out)
    console.say(format_summary(result))
    console.say(json.dumps({"summary": result["summary"]}))
    if console.log_path():
        console.say(f"[medray] log: {console.log_path()}")
    return 0


def _tune(args) -> int:
    from medray import console
    from medray.tune import format_ranking, tune

    console.set_mode(epoch_lines=False)  # plain output: a line per fold of each trial, not per epoch
    result = tune(args.task, args.data, args.out, trials=args.trials, folds=args.folds, seed=args.seed,
                  metric=args.metric, concurrency=args.concurrency, early_stop=not args.no_early_stop,
                  baseline=not args.no_baseline,
                  epochs=args.epochs, workers=args.workers, gpu=args.gpu, storage=args.storage,
                  group_column=args.group_column, label_column=args.label_column, exclude_train=args.exclude_train,
                  max_failures=args.max_failures, skip_bad=args.skip_bad, address=args.address)
    console.move_log(args.out)
    console.say(format_ranking(result))
    if result.get("best"):
        console.say(f"# best config, ready for medray/presets/{args.task}.yaml:\n{result['best']['yaml']}")
    console.say(f"[medray] ranking written to {os.path.join(args.out, 'tune.json')}")
    if console.log_path():
        console.say(f"[medray] log: {console.log_path()}")
    if not result["finished"]:  # Ctrl+C: Tune saved the experiment; the same command resumes it
        console.error("medray: search interrupted; run the same command again to resume it")
        return 130
    return 0


def _evaluate(args) -> int:
    from medray.bundle import load_bundle
    from medray.inference import evaluate

    bundle = load_bundle(args.bundle)
    if bundle.task == "genomic-gan":
        from medray.gan import evaluate_gan

        print(json.dumps(evaluate_gan(bundle, args.data, n=args.n, seed=args.seed, classifier=args.classifier),
                         indent=2))
        return 0
    print(json.dumps(evaluate(bundle, args.data, report=args.report, **_inference_options(args)), indent=2))
    if args.report:
        print(f"[medray] report (plots and model card) written to {args.report}", file=sys.stderr)
    return 0


def _inference_options(args) -> dict:
    if args.actors is not None and args.actors < 1 or args.batch_size < 1:
        raise MedrayError("--actors and --batch-size must be at least 1")
    return {"skip_bad": args.skip_bad, "engine": args.engine, "address": args.address, "actors": args.actors,
            "batch_size": args.batch_size, "gpu": args.gpu}


def _generate(args) -> int:
    from Bio import SeqIO
    from Bio.Seq import Seq
    from Bio.SeqRecord import SeqRecord

    from medray.bundle import load_bundle
    from medray.gan import generate

    bundle = load_bundle(args.bundle)
    seqs, labels = generate(bundle, args.n, label=args.label, seed=args.seed)
    records = [SeqRecord(Seq(s), id=f"gen-{args.seed}-{i + 1}", description=f"label={lab}" if lab else "")
               for i, (s, lab) in enumerate(zip(seqs, labels))]
    if args.out:
        with open(args.out, "w") as f:
            SeqIO.write(records, f, "fasta")
        print(f"{len(records)} sequences written to {args.out}", file=sys.stderr)
    else:
        SeqIO.write(records, sys.stdout, "fasta")
    return 0


def _predict(args) -> int:
    from medray.bundle import load_bundle
    from medray.inference import predict

    bundle = load_bundle(args.bundle)
    summary = predict(bundle, args.data, args.out, fmt=args.format, **_inference_options(args))
    if args.out:
        skipped = (f"; {len(summary['skipped'])} skipped, listed in {summary['skipped_file']}"
                   if summary["skipped"] else "")
        print(f"[medray] {summary['rows']} predictions written to {args.out} in {summary['seconds']:.1f} s"
              f"{skipped}", file=sys.stderr)
    return 0


def _serve(args) -> int:
    from serve.local import serve_bundles

    if args.no_auth and args.tokens_file:
        raise MedrayError("give --tokens-file or --no-auth, not both")
    serve_bundles(args.bundles, host=args.host, port=args.port, address=args.address,
                  throughput_optimized=not args.no_throughput_optimized, config_path=args.config,
                  tokens_file=args.tokens_file, no_auth=args.no_auth, audit_log=args.audit_log)
    return 0


def _token(args) -> int:
    from serve.security import MODEL_TASKS, new_token, token_id

    unknown = [m for m in args.models if m not in MODEL_TASKS]
    if unknown:
        raise MedrayError(f"unknown model name(s) {unknown} (known: {', '.join(MODEL_TASKS)})")
    token = new_token()
    print(" ".join([token, *args.models]))
    print(f"# a line for the tokens file; in logs this caller is {token_id(token)}", file=sys.stderr)
    return 0


def _submit(args) -> int:
    from medray import jobs

    job_id = jobs.submit(args.spec, args.address, working_dir=args.working_dir, pip=args.pip,
                         submission_id=args.job_id)
    print(job_id, flush=True)
    if not args.follow:
        print(f"[medray] submitted; follow with: medray jobs logs {job_id} --address {args.address} --follow",
              file=sys.stderr)
        return 0
    status = jobs.follow(args.address, job_id)
    print(f"[medray] job {job_id}: {status}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else 1


def _jobs(args) -> int:
    from medray import jobs

    if args.action == "list":
        for j in jobs.list_jobs(args.address):
            print(f"{j['id']}\t{j['status']}\t{j['entrypoint'][:100]}")
        return 0
    if not args.job_id:
        raise MedrayError(f"medray jobs {args.action} needs a JOB_ID")
    if args.action == "logs":
        if args.follow:
            status = jobs.follow(args.address, args.job_id)
            return 0 if status == "SUCCEEDED" else 1
        sys.stdout.write(jobs.logs(args.address, args.job_id))
        return 0
    stopped = jobs.stop(args.address, args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def _demo(args) -> int:
    from medray import console
    from medray.demo import run_demo

    console.set_mode(epoch_lines=False)  # plain output: a line per model, not per epoch
    console.move_log(args.workdir)
    run_demo(args.workdir, workers=args.workers, quick=args.quick)
    if console.log_path():
        console.say(f"[medray] log (Ray's own output, warnings): {console.log_path()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model as a Ray Train job and write a bundle")
    t.add_argument("task", choices=[*TASKS, "genomic-gan"])
    t.add_argument("--data", required=True, help="CSV/Parquet (exercise), image folder or manifest CSV "
                   "(ultrasound), FASTA or CSV (genomic)")
    t.add_argument("--out", required=True, help="bundle directory to write")
    _training_arguments(t)
    t.add_argument("--name", help="run name; the same name and storage resume (default: derived from data+config)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="genomic-gan: condition on the labels, e.g. EI/IE/N (default: when the data has labels; "
                   "--no-conditional to ignore them)")
    t.add_argument("--n-critic", type=int, help="genomic-gan: critic steps per generator step (default 5)")
    t.set_defaults(func=_train)

    cv = sub.add_parser("cv", help="grouped K-fold cross-validation: one Ray Train job per fold, mean ± sd")
    cv.add_argument("task", choices=TASKS)
    cv.add_argument("--data", required=True, help="the data `medray train` takes")
    _training_arguments(cv)
    cv.add_argument("--folds", type=int, default=5, help="K (default 5); grouped by --group-column when given")
    cv.add_argument("--seeds", default="0", help="comma-separated seeds; each gives its own folds (default 0)")
    cv.add_argument("--out", help="keep each fold's bundle and cv.json in this folder (default: discard bundles)")
    cv.set_defaults(func=_cv)

    tu = sub.add_parser("tune", help="search architecture and recipe with Ray Tune, trials scored by grouped "
                        "K-fold CV, ASHA early stopping (search spaces: presets/TASK.yaml `search:`)")
    tu.add_argument("task", choices=TASKS)
    tu.add_argument("--data", required=True, help="the data `medray train` takes")
    tu.add_argument("--out", required=True, help="folder for tune.json and the Tune experiment (the same command "
                    "with the same --out resumes)")
    tu.add_argument("--trials", type=int, default=8, help="configs drawn from the search space (default 8)")
    tu.add_argument("--folds", type=int, default=5, help="K of each trial's CV (default 5)")
    tu.add_argument("--seed", type=int, default=0, help="seeds the draws and the folds (default 0)")
    tu.add_argument("--metric", choices=["accuracy", "balanced_accuracy"], default="accuracy",
                    help="what trials are ranked and stopped by: its mean over the folds (default accuracy)")
    tu.add_argument("--concurrency", type=int, default=1, help="trials at once (default 1; capped to what the "
                    "cluster's CPUs hold)")
    tu.add_argument("--no-early-stop", action="store_true", help="run every trial's every fold (no ASHA)")
    tu.add_argument("--no-baseline", action="store_true", help="draw every trial (default: the first trial is "
                    "the preset's default, which the others are measured against)")
    tu.add_argument("--epochs", type=int, help="every trial's epochs (default: the drawn or preset value)")
    tu.add_argument("--workers", type=int, default=2, help="Ray Train workers per fold (default 2)")
    tu.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    tu.add_argument("--storage", help="fold runs' checkpoint storage (default $MEDRAY_STORAGE or ~/medray-runs)")
    tu.add_argument("--group-column", help="group the folds by COLUMN, FILE:COLUMN or id-prefix[:SEP]")
    tu.add_argument("--label-column", help="exercise: label column (default: the last column)")
    tu.add_argument("--exclude-train", metavar="SPEC", help="as for medray cv")
    tu.add_argument("--max-failures", type=int, default=2, help="worker-group restarts per fold")
    tu.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local instance)")
    tu.add_argument("--skip-bad", action="store_true", help="leave out unreadable items instead of failing")
    _verbose_argument(tu)
    tu.set_defaults(func=_tune)

    e = sub.add_parser("evaluate", help="metrics of a bundle on labelled data, as JSON")
    e.add_argument("bundle")
    e.add_argument("--data", required=True, help="labelled data; for a genomic-gan bundle: real sequences "
                   "(held out from its training when possible)")
    e.add_argument("--n", type=int, help="genomic-gan: sequences to generate (default: 5000, or the "
                   "real half's size if larger)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--classifier", help="genomic-gan (conditional): a genomic classifier bundle to label the "
                   "generated sequences with")
    e.add_argument("--report", metavar="DIR", help="also write plots (confusion matrix, ROC, reliability diagram) "
                   "and a model card for this data into DIR")
    _inference_arguments(e)
    e.set_defaults(func=_evaluate)

    g = sub.add_parser("generate", help="sample DNA sequences from a genomic-gan bundle (FASTA)")
    g.add_argument("bundle")
    g.add_argument("--n", type=int, default=10)
    g.add_argument("--label", help="class to generate (conditional generators)")
    g.add_argument("--seed", type=int, default=0, help="the same seed gives the same sequences")
    g.add_argument("--out", help="FASTA file (default: stdout)")
    g.set_defaults(func=_generate)

    pr = sub.add_parser("predict", help="predictions of a bundle, one row per input (Parquet, CSV or JSON Lines)")
    pr.add_argument("bundle")
    pr.add_argument("--data", required=True, help="what training reads: a path or a URI (s3://, gs://)")
    pr.add_argument("--out", help="a file (.parquet, .csv, .jsonl) or a folder of parts (a path or URI without a "
                    "suffix, written in parallel); default: CSV on stdout")
    pr.add_argument("--format", choices=["parquet", "csv", "json"], help="format of a folder output (default parquet)")
    _inference_arguments(pr)
    pr.set_defaults(func=_predict)

    s = sub.add_parser("serve", help="serve bundles over HTTP with Ray Serve (one deployment per bundle)")
    s.add_argument("bundles", nargs="+", metavar="BUNDLE_DIR", help="one bundle per task")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local instance)")
    s.add_argument("--no-throughput-optimized", action="store_true",
                   help="local instance: leave RAY_SERVE_THROUGHPUT_OPTIMIZED off (see README, Serving)")
    s.add_argument("--config", help="Serve config whose deployment settings, limits, auth, cors_origins and "
                   "audit_log apply (default: serve/config.yaml)")
    s.add_argument("--tokens-file", help="bearer tokens, one per line, each optionally followed by the models it "
                   "may call (default: the config's auth.tokens_file)")
    s.add_argument("--no-auth", action="store_true", help="no authentication (local development only)")
    s.add_argument("--audit-log", help="append audit lines (JSON) to this file (default: the ingress's stderr)")
    s.set_defaults(func=_serve)

    tk = sub.add_parser("token", help="print a new random API token line for a tokens file")
    tk.add_argument("models", nargs="*", help="models the token may call (default: all)")
    tk.set_defaults(func=_token)

    default_address = os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")
    sb = sub.add_parser("submit", help="submit a training job spec (YAML) to a Ray cluster (Ray Jobs SDK)")
    sb.add_argument("spec", help="job spec YAML (see jobs/specs/)")
    sb.add_argument("--address", default=default_address, help="Ray dashboard address (default $RAY_ADDRESS "
                    "or http://127.0.0.1:8265)")
    sb.add_argument("--follow", action="store_true", help="stream the logs; exit status is the job's outcome")
    sb.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir (default: .)")
    sb.add_argument("--pip", nargs="*", help="pip requirements installed for the job (default: none; the "
                    "cluster image has medray's dependencies)")
    sb.add_argument("--job-id", help="submission id (default: generated)")
    sb.set_defaults(func=_submit)

    jb = sub.add_parser("jobs", help="list, show logs of, or stop jobs on a Ray cluster")
    jb.add_argument("action", choices=["list", "logs", "stop"])
    jb.add_argument("job_id", nargs="?")
    jb.add_argument("--address", default=default_address)
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jb.set_defaults(func=_jobs)

    d = sub.add_parser("demo", help="generate synthetic data for all tasks, train, evaluate, summarise")
    d.add_argument("--workdir", default=".medray-demo")
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--quick", action="store_true", help="smaller data, one ultrasound model (for tests)")
    _verbose_argument(d)
    d.set_defaults(func=_demo)
    return p


def _verbose_argument(p) -> None:
    p.add_argument("--verbose", action="store_true", help="show Ray's own output and warnings on the terminal "
                   "(default: they go to a log file, named at the end; medray shows its progress display)")


def _training_arguments(p) -> None:
    """What `train` and `cv` share: the model, its recipe, the workers and the data's columns."""
    _verbose_argument(p)
    p.add_argument("--model", help="architecture (default: the task's best measured one; see presets/)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (data-parallel), default 2")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, mixed precision")
    p.add_argument("--storage", help="checkpoint storage path or URI (default $MEDRAY_STORAGE or ~/medray-runs)")
    p.add_argument("--group-column", help="group validation split by COLUMN, FILE:COLUMN or id-prefix[:SEP]")
    p.add_argument("--label-column", help="exercise: label column (default: the last column)")
    p.add_argument("--exclude-train", metavar="SPEC", help="leave rows flagged in COLUMN or FILE:COLUMN (1/true/yes) "
                   "out of training; validation keeps them (e.g. manifest.csv:label_conflict)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    p.add_argument("--mlflow", metavar="URI", help="log params, per-epoch metrics, the report and the bundle to "
                   "MLflow: sqlite:///runs.db (a local file, no server) or a tracking server URL; needs "
                   "pip install 'medray[mlflow]' (docs/training.md)")
    p.add_argument("--mlflow-experiment", metavar="NAME", help="MLflow experiment (default: the task name)")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local instance)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, malformed rows and "
                   "bad sequences (counted in the log and the bundle) instead of failing on them")


def _inference_arguments(p) -> None:
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images, malformed rows and bad "
                   "sequences (listed in NAME.skipped.txt beside the output) instead of failing on them")
    p.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS; small local data is scored in "
                   "this process, the rest on a local Ray instance)")
    p.add_argument("--actors", type=int, help="predictor actors, each holding the model once (default: one per "
                   "GPU with --gpu, else one per 4 CPUs of the cluster)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass (default 256)")
    p.add_argument("--gpu", action="store_true", help="one GPU per predictor actor")
    p.add_argument("--engine", choices=["auto", "local", "ray"], default="auto",
                   help="auto (default): in this process for small local data, else Ray Data")


# commands that run Ray Train jobs: quiet by default (medray/console.py), --verbose for everything
QUIET_COMMANDS = ("train", "cv", "tune", "demo")


def main(argv=None) -> int:
    import contextlib

    from medray import console

    args = build_parser().parse_args(argv)
    quiet = (console.quiet(args.command, verbose=getattr(args, "verbose", False))
             if args.command in QUIET_COMMANDS else contextlib.nullcontext())
    with quiet:
        try:
            return args.func(args)
        except MedrayError as e:
            console.error(f"medray: error: {e}")
            _name_log(console)
            return 2
        except BrokenPipeError:  # `medray predict … | head`
            sys.stderr.close()
            return 0
        except KeyboardInterrupt:
            console.error("medray: interrupted")
            return 130
        except Exception:  # a bug, or an error from a library: its traceback, in full, on the terminal
            import traceback

            console.error(traceback.format_exc().rstrip())
            _name_log(console)
            return 1


def _name_log(console) -> None:
    if console.log_path():
        console.error(f"medray: Ray's own output for this run is in {console.log_path()}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())

"""RecBole 1.2's SASRec on ML-100K with issue 26's settings: the reference the project's
next-item models are compared with (docs/results.md, "Public data: ML-100K parity with
RecBole (issue 26)"). Not project code: it runs in a virtualenv of its own with recbole
installed (docs/results.md, "Reproducing RecBole's reference"), and nothing in the
project or its tests imports it, since recbole is not a project dependency.

    cd /tmp/recbole-run && python $REPO/reference/recbole_sasrec.py --seed 2020 --out /tmp/recbole-2020

RecBole writes log/ and log_tensorboard/ into the working directory (a file named `log`
there stops it), hence a scratch folder.

Settings: 12 epochs, batch 256, max length 50, cross-entropy over all items, no negative
sampling, leave-one-out by time ("LS": valid_and_test, ordered by time, grouped by user),
full ranking, HR@10 / NDCG@10 / MRR@10, validation after every epoch on MRR@10 (RecBole's
default), one torch thread. It prints RecBole's figure (test at the epoch best on
validation MRR@10) and the last epoch's test figure beside it, then wall and CPU seconds.

This is the same sequence of calls as `recbole.quick_start.run_recbole`, written out
because that module imports `ray` (an optional extra of recbole) at import time."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import numpy as np
import torch

# Shim 1: numpy 2 removed the aliases np.float_, np.complex_ and np.unicode_; RecBole's
# Config.compatibility_settings reads them (np.float = np.float_, ...), so building a
# Config fails with AttributeError unless they exist.
for _old, _new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, _old):
        setattr(np, _old, _new)

# Shim 2: torch >= 2.6 loads with weights_only=True by default; RecBole's checkpoint holds
# its Config and other Python objects, so reloading the best-validation epoch for the test
# raises an UnpicklingError. The only file loaded is the checkpoint this run just wrote.
torch.load = functools.partial(torch.load, weights_only=False)

# The third requirement is a package, not a shim: recbole.model imports every model, and
# LDiffRec imports kmeans_pytorch, which recbole 1.2 does not declare: pip install kmeans-pytorch.
from recbole.config import Config  # noqa: E402  (after the shims)
from recbole.data import create_dataset, data_preparation  # noqa: E402
from recbole.utils import get_model, get_trainer, init_logger, init_seed  # noqa: E402


def settings(seed: int, out: str, epochs: int) -> dict:
    """RecBole's config dict: the issue's run (seed 2020) with the seed and folder given. No
    data path: for "ml-100k" RecBole always reads the copy packaged with it
    (recbole/dataset_example/ml-100k, the file `climber data fetch ml-100k` takes from the
    same wheel), whatever data_path says."""
    return dict(
        checkpoint_dir=out, use_gpu=False, seed=seed, reproducibility=True, show_progress=False,
        epochs=epochs, train_batch_size=256, MAX_ITEM_LIST_LENGTH=50, loss_type="CE",
        train_neg_sample_args=None,
        eval_args={"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        metrics=["Hit", "NDCG", "MRR"], topk=[10], valid_metric="MRR@10",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="RecBole 1.2 SASRec on ML-100K (issue 26's reference run)")
    parser.add_argument("--seed", type=int, default=2020, help="RecBole's seed (the issue's run: 2020)")
    parser.add_argument("--out", required=True, help="folder for RecBole's checkpoint")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    # RecBole's Config also reads sys.argv: every --key=value would override the dict below
    # (and it warns about the rest). The settings are this script's, so it sees none.
    sys.argv = sys.argv[:1]
    torch.set_num_threads(args.threads)

    config = Config(model="SASRec", dataset="ml-100k",
                    config_dict=settings(args.seed, args.out, args.epochs))
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)

    wall, cpu = time.perf_counter(), time.process_time()
    _, best_valid = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
    test_last = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    test_best = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    def plain(result) -> dict:
        return {k: round(float(v), 4) for k, v in dict(result).items()}

    print("RESULT seed", args.seed, json.dumps({
        "best valid": plain(best_valid), "test (best valid epoch)": plain(test_best),
        "test (last epoch)": plain(test_last), "wall_s": round(wall), "cpu_s": round(cpu)}))


if __name__ == "__main__":
    main()

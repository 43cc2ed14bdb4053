"""Start-up checks (`fedstack.preflight.check_run`): each refuses with a ConfigError naming its
key, creates nothing, and agrees with what the clients' own data code would do."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedstack.config import ConfigError, compose_config, config_to_yaml, with_values
from fedstack.preflight import check_run, smallest_usable_partition
from fedstack.task.client_data import load_client_data
from fedstack.task.datasets import load_task_data

#: The README's skewed example (5 clients): flwr-datasets finds no Dirichlet draw that gives
#: every client partition.min_partition_size=10 samples, so every client fails every round.
README_SKEWED = ["task=breast_cancer", "partition.alpha=0.1", "num_clients=5"]
#: A feasible Dirichlet split in which client 1 gets 2 samples: 2 train, 0 validation.
TINY_CLIENT = ["task=breast_cancer", "partition.alpha=0.1", "partition.min_partition_size=1",
               "seed=2"]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config([f"output_dir={tmp_path / 'out'}", *overrides])


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------- a good config


def test_default_config_passes_and_reports_what_every_client_gets(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "task=breast_cancer")
    before = _tree(tmp_path)
    report = check_run(cfg, deployment=False)
    assert _tree(tmp_path) == before, "a check must not create anything"
    assert report.output == str(tmp_path / "out")
    assert len(report.clients) == cfg.num_clients
    # The sizes are the clients' own: load each partition the way a client does.
    for sizes in report.clients:
        client = load_client_data(cfg, sizes.partition_id, cfg.num_clients)
        assert (sizes.train, sizes.val) == (len(client.train), len(client.y_val))
    assert sum(c.train + c.val for c in report.clients) == report.train_pool
    assert report.label_mapping == {"malignant": 0, "benign": 1}
    assert report.max_weight_key == "max_num_examples"
    written = json.loads(report.write(tmp_path).read_text())
    assert written["clients"][0] == {"partition_id": 0, "train": report.clients[0].train,
                                     "val": report.clients[0].val}
    assert "preflight ok" in report.summary()


def test_check_run_never_starts_ray(tmp_path: Path) -> None:
    code = ("import sys; from fedstack.config import compose_config; "
            "from fedstack.preflight import check_run; "
            f"check_run(compose_config(['task=breast_cancer', 'output_dir={tmp_path}']), "
            "deployment=False); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                         text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False"


# --------------------------------------------------------------------------- partitions


def test_readme_skewed_split_is_refused_naming_alpha_and_clients(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, *README_SKEWED)
    with pytest.raises(ConfigError, match=r"partition\.alpha=0\.1.*num_clients=5") as exc:
        check_run(cfg, deployment=False)
    assert "partition.min_partition_size" in str(exc.value)
    # The refusal is the clients' own failure, found before any client runs.
    with pytest.raises(ConfigError, match="cannot split"):
        load_client_data(cfg, 0, cfg.num_clients)
    assert not (tmp_path / "out").exists()


def test_client_without_validation_data_is_named(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, *TINY_CLIENT)
    client = load_client_data(cfg, 1, cfg.num_clients)
    assert (len(client.train), len(client.y_val)) == (2, 0)  # the case this test is about
    with pytest.raises(ConfigError, match=r"client 1 gets 2 samples \(2 train, 0 validation\)"
                       ) as exc:
        check_run(cfg, deployment=False)
    message = str(exc.value)
    assert "task.client_val_fraction=0.2" in message
    assert f"partition.min_partition_size >= {smallest_usable_partition(0.2)}" in message
    # Without a validation split the same partition can train.
    report = check_run(_cfg(tmp_path, *TINY_CLIENT, "task.client_val_fraction=0.0"),
                       deployment=False)
    assert report.clients[1].train == 2 and report.clients[1].val == 0


def test_smallest_usable_partition_matches_the_client_split() -> None:
    assert smallest_usable_partition(0.0) == 1
    assert smallest_usable_partition(0.2) == 3  # round(2 * 0.2) = 0 validation examples
    assert smallest_usable_partition(0.5) == 2


def test_max_num_examples_below_a_client_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"max_num_examples=20 .*client 0 has"):
        check_run(_cfg(tmp_path, "task=breast_cancer", "max_num_examples=20"),
                  deployment=False)


def test_he_max_weight_below_a_client_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.max_weight=20 "):
        check_run(_cfg(tmp_path, "task=breast_cancer", "aggregation=he",
                       "aggregation.max_weight=20"), deployment=False)


def test_dp_delta_not_below_one_over_n_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "task=breast_cancer", "dp=local", "dp.delta=0.01")
    with pytest.raises(ConfigError, match=r"dp\.delta=0\.01 .*client \d+ has \d+"):
        check_run(cfg, deployment=False)
    ok = _cfg(tmp_path, "task=breast_cancer", "dp=local", "dp.delta=0.001")
    assert check_run(ok, deployment=False).clients


def test_dp_public_schedule_delta_is_checked_against_every_partition(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under secagg the run-wide δ (1/(10 x the bound on n_k)) is what every client uses:
    below 1/n_k for every partition within the bound; checked again on the real sizes."""
    cfg = _cfg(tmp_path, "task=breast_cancer", "aggregation=secagg", "dp=local",
               "dp.sample_rate=0.25")
    assert check_run(cfg, deployment=False).clients
    from fedstack.privacy import schedule

    real = schedule.public_schedule

    def loose(c):  # a schedule whose δ the bound did not keep below 1/n_k
        found = real(c)
        return None if found is None else dataclasses.replace(found, delta=0.05)

    monkeypatch.setattr(schedule, "public_schedule", loose)
    with pytest.raises(ConfigError, match=r"the public schedule's delta=0\.05 is not below "
                                          r"1/n_k .*client \d+ has \d+"):
        check_run(cfg, deployment=False)


# --------------------------------------------------------------------------- output_dir, resume


def test_output_dir_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir=.*a-file is a file"):
        check_run(compose_config([f"output_dir={blocker}/runs"]), deployment=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root may write anywhere; permissions cannot be tested")
def test_unwritable_output_dir_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="output_dir="):
        check_run(compose_config([f"output_dir={locked}/runs"]), deployment=False)


def test_missing_output_dir_is_fine_and_not_created(tmp_path: Path) -> None:
    base = tmp_path / "not" / "yet"
    report = check_run(compose_config([f"output_dir={base}", "task=breast_cancer"]),
                       deployment=False)
    assert report.output == str(base)
    assert _tree(tmp_path) == []


def test_bad_run_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_name="):
        check_run(_cfg(tmp_path, "run_name='a b'"), deployment=False)


def test_resume_needs_a_run_directory(tmp_path: Path) -> None:
    cfg = compose_config(["task=breast_cancer", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"resume=.*is not a directory"):
        check_run(with_values(cfg, resume=str(tmp_path / "nope")), deployment=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"resume=.*no config\.yaml"):
        check_run(with_values(cfg, resume=str(empty)), deployment=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("num_rounds: [1, 2\n")
    with pytest.raises(ConfigError, match=r"resume=.*config\.yaml cannot be used"):
        check_run(with_values(cfg, resume=str(broken)), deployment=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_to_yaml(cfg))
    report = check_run(with_values(cfg, resume=str(run)), deployment=False)
    assert report.output == str(run) and sorted(os.listdir(run)) == ["config.yaml"]


# --------------------------------------------------------------------------- HE key files


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fedstack.strategies.he.provisioning import provision_keys

    a_secret, a_public = provision_keys(tmp_path_factory.mktemp("key-a"), "standard")
    b_secret, _ = provision_keys(tmp_path_factory.mktemp("key-b"), "standard")
    return {"secret": a_secret, "public": a_public, "other_secret": b_secret}


def _he(tmp_path: Path, *overrides: str):
    return _cfg(tmp_path, "task=breast_cancer", "aggregation=he", *overrides)


def test_he_key_pair_passes(tmp_path: Path, he_keys: dict[str, Path]) -> None:
    from fedstack.strategies.he.keys import load_public_context

    report = check_run(_he(tmp_path, f"aggregation.public_context={he_keys['public']}",
                           f"aggregation.secret_context={he_keys['secret']}"),
                       deployment=False)
    assert report.he_fingerprint == load_public_context(he_keys["public"]).fingerprint


def test_he_simulation_without_key_files_generates_later(tmp_path: Path) -> None:
    assert check_run(_he(tmp_path), deployment=False).he_fingerprint is None


@pytest.mark.parametrize("make_bad", ["missing", "garbage", "secret"])
def test_bad_public_context_is_refused(tmp_path: Path, he_keys: dict[str, Path],
                                       make_bad: str) -> None:
    path = {"missing": tmp_path / "none.ckks", "garbage": tmp_path / "junk.ckks",
            "secret": he_keys["secret"]}[make_bad]
    if make_bad == "garbage":
        path.write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=r"^aggregation\.public_context"):
        check_run(_he(tmp_path, f"aggregation.public_context={path}",
                      f"aggregation.secret_context={he_keys['secret']}"), deployment=False)


def test_deployment_without_public_context_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"aggregation\.public_context is not set"):
        check_run(_he(tmp_path), deployment=True)


def test_simulated_clients_need_the_secret_context(tmp_path: Path,
                                                   he_keys: dict[str, Path]) -> None:
    public = f"aggregation.public_context={he_keys['public']}"
    with pytest.raises(ConfigError, match=r"aggregation\.secret_context is empty"):
        check_run(_he(tmp_path, public), deployment=False)
    with pytest.raises(ConfigError, match=r"aggregation\.secret_context=.*no such file"):
        check_run(_he(tmp_path, public, f"aggregation.secret_context={tmp_path}/x.ckks"),
                  deployment=False)
    with pytest.raises(ConfigError, match=r"aggregation\.secret_context=.*public context"):
        check_run(_he(tmp_path, public, f"aggregation.secret_context={he_keys['public']}"),
                  deployment=False)
    with pytest.raises(ConfigError, match="not one key pair"):
        check_run(_he(tmp_path, public,
                      f"aggregation.secret_context={he_keys['other_secret']}"),
                  deployment=False)
    # In a deployment the secret file lives on the SuperNodes: its absence here is a note.
    report = check_run(_he(tmp_path, public, f"aggregation.secret_context={tmp_path}/x.ckks"),
                       deployment=True)
    assert any("not on the server's machine" in n for n in report.notes)


# --------------------------------------------------------------------------- hf data


def _frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    frame["label"] = np.where(x[:, 0] > 0, "sick", "healthy")
    return frame


def _hf(tmp_path: Path, data_files: object, *overrides: str):
    return _cfg(tmp_path, "task=hf", "task.dataset=csv", f"task.data_files={data_files}",
                "partition=iid", *overrides)


def test_empty_csv_names_data_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.touch()
    cfg = _hf(tmp_path, empty)
    with pytest.raises(ConfigError, match=r"task\.data_files=.*empty\.csv is empty"):
        check_run(cfg, deployment=False)
    with pytest.raises(ConfigError, match=r"task\.data_files"):
        load_task_data(cfg.task, cfg.seed)  # the clients' loader says the same


def test_header_only_csv_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("a,b,label\n")
    with pytest.raises(ConfigError, match=r"task\.data_files="):
        check_run(_hf(tmp_path, path), deployment=False)


def test_missing_data_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"task\.data_files=.*no such file"):
        check_run(_hf(tmp_path, tmp_path / "nope.csv"), deployment=False)
    with pytest.raises(ConfigError, match=r"task\.data_files=.*no such file"):
        check_run(_hf(tmp_path, f"{tmp_path}/*.parquet"), deployment=False)


def test_missing_label_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    _frame().rename(columns={"label": "y"}).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=r"task\.label_column='label'"):
        check_run(_hf(tmp_path, path), deployment=False)


def test_text_label_mapping_is_sorted_and_independent_of_row_order(tmp_path: Path) -> None:
    frame = _frame()
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    frame.to_csv(first, index=False)
    frame.sample(frac=1.0, random_state=1).to_csv(second, index=False)
    reports = [check_run(_hf(tmp_path, path), deployment=False) for path in (first, second)]
    assert reports[0].label_mapping == reports[1].label_mapping == {"healthy": 0, "sick": 1}
    data = load_task_data(_hf(tmp_path, first).task, 42)
    sick = data.x_train[data.y_train == 1]
    # standardised column a: every "sick" row had a > 0, i.e. above the column's mean shift
    assert (sick[:, 0] > data.x_train[data.y_train == 0][:, 0].max()).all()


def test_label_mapping_covers_every_split(tmp_path: Path) -> None:
    train, test = _frame(200, 0), _frame(60, 1)
    train.loc[:9, "label"] = "aardvark"  # a class the test split never has, sorted first
    (tmp_path / "train.csv").write_text(train.to_csv(index=False))
    (tmp_path / "test.csv").write_text(test.to_csv(index=False))
    cfg = _cfg(tmp_path, "task=hf", "task.dataset=csv", "partition=iid",
               f"task.data_files={{train: {tmp_path}/train.csv, test: {tmp_path}/test.csv}}",
               "task.test_split=test")
    report = check_run(cfg, deployment=False)
    assert report.label_mapping == {"aardvark": 0, "healthy": 1, "sick": 2}
    data = load_task_data(cfg.task, cfg.seed)
    assert data.num_classes == 3
    # "healthy" and "sick" are 1 and 2 in the test split too (mapped with the train split)
    assert set(np.unique(data.y_test).tolist()) == {1, 2}


# --------------------------------------------------------------------------- dp=local model


def test_dp_model_that_cannot_be_clipped_is_refused_at_start_up(tmp_path: Path,
                                                                monkeypatch) -> None:
    """A parameter reached through two modules would be under-clipped: refused, naming both."""
    import torch

    class Tied(torch.nn.Module):
        def __init__(self, d_in: int, k: int) -> None:
            super().__init__()
            self.enc = torch.nn.Linear(d_in, d_in)
            self.dec = torch.nn.Linear(d_in, d_in)
            self.dec.weight = self.enc.weight
            self.head = torch.nn.Linear(d_in, k)

        def forward(self, x):
            return self.head(self.dec(self.enc(x)))

    import fedstack.task.models as models

    monkeypatch.setattr(models, "build_model",
                        lambda name, shape, k, seed: Tied(int(np.prod(shape)), k))
    cfg = _cfg(tmp_path, "task=breast_cancer", "partition=iid", "dp=local")
    with pytest.raises(ConfigError, match=r"task.model=.*dp=local.*'enc'.*'dec'|"
                                          r"task.model=.*dp=local.*'dec'.*'enc'"):
        check_run(cfg)
    assert not (tmp_path / "out").exists()
    check_run(_cfg(tmp_path, "task=breast_cancer", "partition=iid"))  # no DP: no such check

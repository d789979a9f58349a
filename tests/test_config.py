"""Every option of every config group composes against the typed schema and validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dsee_cli.cli import _register, config_dir, dirname_for, sweep_group, with_default_profile
from dsee_cli.config import RunConfig, validate
from dsee_cli.errors import DSEEError

GROUPS = ["model", "task", "adapter", "omega", "pruning", "trainer", "logger", "experiment", "recipe", "modules",
          "importance", "profile"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    _register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_validates(group, option, monkeypatch):
    monkeypatch.setenv("DSEE_MINI_MODEL", "/some/model")  # profile=mini reads these
    monkeypatch.setenv("DSEE_GLUE_DIR", "/some/glue_data")
    overrides = [f"{group}={option}"]
    if group == "model" and option == "local":
        overrides.append("model.path=/some/dir")
    cfg = _compose(overrides)
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, RunConfig)
    validate(typed)


def test_defaults_are_the_offline_demo_and_glue_tasks_use_bert_base():
    assert OmegaConf.to_object(_compose([])).model.name == "tiny-bert"
    rte = OmegaConf.to_object(_compose(["task=rte"]))
    assert rte.model.name == "bert-base" and rte.task.lr == 6e-4 and rte.task.recovery_epochs == 10
    assert OmegaConf.to_object(_compose(["task=rte", "model=tiny-gpt2"])).model.name == "tiny-gpt2"


def test_every_group_has_options_and_paper_table11_rates():
    for group in GROUPS:
        assert _options(group), group
    rates = {t: OmegaConf.to_object(_compose([f"task={t}"])).task.lr for t in
             ("mnli", "qnli", "qqp", "sst2", "cola", "mrpc", "rte", "stsb")}
    assert rates == {"mnli": 2e-4, "qnli": 2e-4, "qqp": 2e-4, "sst2": 2e-4, "cola": 1e-3, "mrpc": 8e-4,
                     "rte": 6e-4, "stsb": 8e-4}


def test_local_model_without_a_path_is_refused():
    with pytest.raises(DSEEError, match="model.path"):
        validate(OmegaConf.to_object(_compose(["model=local", "model.path=null"])))


def test_run_directory_names_are_safe_and_bounded():
    assert dirname_for("") == "default"
    assert dirname_for("model.path=/a/b,task=rte") == "model.path=_a_b,task=rte"
    long = dirname_for("x=" + "y" * 500)
    assert len(long) <= 120 and "/" not in long and Path(long).name == long


def test_a_sweep_command_gets_one_w_and_b_group():
    assert sweep_group(["task=rte", "seed=1"]) is None
    one = sweep_group(["-m", "task=rte,sst2", "seed=1,2"])
    assert one == sweep_group(["seed=1,2", "-m", "task=rte,sst2"]) and one.startswith("sweep-")
    assert one != sweep_group(["-m", "task=rte", "seed=1,2"])


def test_smoke_profile_keeps_the_sweep_and_runs_one_seed():
    cfg = _compose(["experiment=table6", "recipe=dsee-6heads", "profile=smoke"])
    typed = OmegaConf.to_object(cfg)
    assert typed.name == "table6" and typed.model.name == "tiny-bert" and typed.model.tiny.heads == 12
    assert typed.task.synthetic_standin and typed.pruning.method == "structured"
    assert typed.pruning.heads_to_remove == 6 and typed.adapter.method == "dsee"


def test_method_rows_and_sparse_training_pick_their_pruning():
    from dsee_cli.run.plan import phase_lr

    bitfit = OmegaConf.to_object(_compose(["recipe=bitfit", "task=rte"]))
    assert bitfit.adapter.method == "bitfit" and bitfit.pruning.method == "none"
    assert phase_lr(bitfit, "phase1") == (1e-3, "adapter=bitfit's usual rate")
    pst = OmegaConf.to_object(_compose(["adapter=pst", "sparsity=0.9"]))
    assert pst.pruning.method == "none" and pst.adapter.sparse_training.r1 == pst.adapter.sparse_training.r2 == 8
    tickets = OmegaConf.to_object(_compose(["recipe=bert-tickets"]))
    assert tickets.pruning.method == "imp" and tickets.pruning.rounds == 7 and tickets.pruning.rewind


PAPER_TABLES = [e for e in _options("experiment") if e != "demo"]


@pytest.mark.parametrize("experiment", PAPER_TABLES)
def test_an_experiment_runs_as_the_paper_ran_it_unless_a_profile_is_named(experiment):
    cfg = OmegaConf.to_object(_compose(with_default_profile([f"experiment={experiment}"])))
    assert (cfg.omega.method, cfg.omega.preset) == ("grebsmo", "reference")  # the reference code's GreBsmo
    assert cfg.adapter.init == "normal" and cfg.trainer.keep_best  # Algorithm 2; best checkpoint exported
    smoke = OmegaConf.to_object(_compose(with_default_profile([f"experiment={experiment}", "profile=smoke"])))
    assert smoke.omega.preset == "fast" and smoke.adapter.init == "kaiming" and not smoke.trainer.keep_best


def test_a_single_run_keeps_the_tools_defaults_and_fig2_sweeps_both_finders():
    assert with_default_profile(["task=rte"]) == ["task=rte"]
    assert with_default_profile(["experiment=demo"]) == ["experiment=demo"]
    single = OmegaConf.to_object(_compose(with_default_profile(["task=rte"])))
    assert single.omega.preset == "fast" and single.adapter.init == "kaiming" and not single.trainer.keep_best
    fig2 = OmegaConf.load(config_dir() / "experiment" / "fig2.yaml")
    assert fig2.hydra.sweeper.params.omega.split(",") == ["grebsmo-reference", "grebsmo", "magnitude", "random"]


def test_sparse_training_runs_the_pst_papers_epochs_per_task():
    from dsee_cli.run.plan import phase_epochs

    def epochs(*overrides):
        return phase_epochs(OmegaConf.to_object(_compose(with_default_profile(list(overrides)))), "phase1")
    assert epochs("recipe=pst", "task=sst2") == epochs("adapter=map", "task=rte") == 20
    assert epochs("recipe=mvp", "task=mnli") == epochs("experiment=pst-table2", "recipe=pst", "task=qqp") == 10
    assert epochs("adapter=dsee", "task=rte") == 5 and epochs("adapter=pst", "trainer.phase1.epochs=3") == 3


@pytest.mark.parametrize("overrides,lr,source", [
    (["task=rte"], 6e-4, "task rte (Table 11)"),  # LoRA / DSEE: the paper's Table 11
    (["task=rte", "adapter=full"], 2e-5, "adapter=full's usual rate"),
    (["task=rte", "recipe=finetune"], 2e-5, "adapter=full's usual rate"),
    (["task=rte", "adapter=full", "trainer.phase1.lr=1e-4"], 1e-4, "trainer.phase1.lr"),
    (["task=rte", "adapter=lora", "model=roberta-large"], 4e-4, "task rte with model roberta-large (Table 11)"),
])
def test_each_phase_names_its_learning_rate_and_where_it_came_from(overrides, lr, source):
    from dsee_cli.config import MethodTaskHparams
    from dsee_cli.run.plan import build_plan, phase_lr

    cfg = OmegaConf.to_object(_compose(overrides))
    assert phase_lr(cfg, "phase1") == (lr, source)
    phase1 = next(step for step in build_plan(cfg) if step.name == "phase1")
    assert f"lr {lr:g} ({source})" in phase1.what  # --plan says it too
    cfg.task.per_method[cfg.adapter.method] = MethodTaskHparams(lr=0.5)  # a task's own rate for the method
    expected = (lr, source) if cfg.trainer.phase1.lr else (0.5, f"task rte's rate for adapter={cfg.adapter.method}")
    assert phase_lr(cfg, "phase1") == expected


def test_per_task_settings_apply_to_their_task_and_the_command_line_wins():
    from omegaconf import open_dict

    from dsee_cli.cli import apply_per_task

    def typed(per_task: dict, *command_line: str):
        cfg = _compose(list(command_line))
        with open_dict(cfg):
            cfg.per_task = per_task
        return OmegaConf.to_object(apply_per_task(cfg, list(command_line)))

    table = {"synthetic": {"trainer": {"batch_size": 8, "phase1": {"epochs": 3}}, "task": {"lr": 0.01}},
             "cola": {"task": {"lr": 0.5}}}
    cfg = typed(table)
    assert (cfg.trainer.batch_size, cfg.trainer.phase1.epochs, cfg.task.lr) == (8, 3, 0.01) and cfg.per_task == {}
    cfg = typed(table, "trainer.batch_size=4", "task=synthetic")  # a value set on the command line wins
    assert (cfg.trainer.batch_size, cfg.trainer.phase1.epochs, cfg.task.lr) == (4, 3, 0.01)
    with pytest.raises(Exception, match="bach_size"):  # typed: a misspelt key is an error
        typed({"synthetic": {"trainer": {"bach_size": 8}}})


def test_every_setting_has_a_one_line_help_and_dsee_config_shows_it(capsys):
    from dsee_cli.cli import main
    from dsee_cli.config import describe

    rows = describe(OmegaConf.to_object(_compose([])))
    assert len(rows) > 100 and [key for key, _, text in rows if not text] == []
    assert main(["config", "trainer", "task=rte"]) == 0
    out = capsys.readouterr().out
    assert "trainer.keep_best" in out and "best evaluation" in out and "task.lr" not in out
    assert main(["config", "nosuch"]) == 2 and "Valid sections" in capsys.readouterr().err

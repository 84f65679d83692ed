"""Params files and `--set` overrides; notebook defaults are the embedded run's (actionft.config); the reference
params file holds the reference run's values (../shared/reference/seed_run.md)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from actionft import config
from actionft.errors import ActionftError
from actionft.notebooks import list_notebooks, notebook_parameters
from actionft.params import load_params, parse_override

ROOT = Path(__file__).parents[1]
TINY = ROOT / "params" / "tiny.yaml"
REFERENCE = ROOT / "params" / "gemma4_e4b_kinetics3k.yaml"
SEED_RUN = (ROOT / "../shared/reference/seed_run.md").resolve()


def test_load_params_reads_file():
    params = load_params(TINY)
    assert params == yaml.safe_load(TINY.read_text())
    assert params["run_name"] == "tiny"
    cfg = config.validate(params)  # the rest are the embedded defaults
    assert cfg["model_id"] == "tiny" and cfg["lora_r"] == 64 and cfg["learning_rate"] == 0.002 and cfg["synth"]
    assert cfg["data_path"] == "outputs/data/synth/data.json"


def test_load_params_without_file():
    assert load_params(None) == {}
    assert load_params(None, ["a=1"]) == {"a": 1}


@pytest.mark.parametrize(("text", "key", "value"), [
    ("lora_r=8", "lora_r", 8),
    ("max_steps=-1", "max_steps", -1),
    ("learning_rate=0.0002", "learning_rate", 0.0002),
    ("learning_rate=2e-4", "learning_rate", 2e-4),  # YAML 1.1 would keep this a string
    ("reduce_bucket_size=5E7", "reduce_bucket_size", 5e7),
    ("bf16=true", "bf16", True),
    ("bf16=False", "bf16", False),
    ("optim=adamw_torch", "optim", "adamw_torch"),
    ("save_strategy=no", "save_strategy", "no"),  # YAML 1.1 would make these booleans
    ("save_strategy=No", "save_strategy", "No"),
    ("x=off", "x", "off"),
    ("x=yes", "x", "yes"),
    ("x=on", "x", "on"),
    ("x=y", "x", "y"),
    ("bf16=TRUE", "bf16", True),
    ("run_name=my run", "run_name", "my run"),
    ("run_name='007'", "run_name", "007"),
    ("metadata_path=null", "metadata_path", None),
    ("run_name=", "run_name", ""),
    ("lora_target_modules=[q_proj, v_proj]", "lora_target_modules", ["q_proj", "v_proj"]),
    ("data_path=a=b.json", "data_path", "a=b.json"),  # only the first '=' splits
    (" lora_r = 4", "lora_r", 4),
])
def test_parse_override_types(text, key, value):
    k, v = parse_override(text)
    assert (k, v) == (key, value)
    assert type(v) is type(value)


def test_overrides_apply_in_order_over_file():
    params = load_params(TINY, ["lora_r=4", "bf16=true", "learning_rate=1e-3", "lora_r=8", "new_key=x"])
    assert params["lora_r"] == 8 and params["bf16"] is True and params["learning_rate"] == 1e-3
    assert params["new_key"] == "x"
    assert params["run_name"] == yaml.safe_load(TINY.read_text())["run_name"]  # untouched: the file's value


def test_exponent_floats_in_params_file(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("learning_rate: 2e-4\nweight_decay: 1.0e-2\nname: 2e-4x\n")
    assert load_params(path) == {"learning_rate": 2e-4, "weight_decay": 0.01, "name": "2e-4x"}


def test_yaml_1_1_booleans_stay_strings(tmp_path):
    """`save_strategy: no` is the Trainer's string "no", not False (TrainingArguments raises on False)."""
    from actionft.train import resolve_config, training_arguments

    path = tmp_path / "p.yaml"
    path.write_text("save_strategy: no\nlogging_strategy: off\nbf16: false\nsynth: True\n")
    assert load_params(path) == {"save_strategy": "no", "logging_strategy": "off", "bf16": False, "synth": True}
    cfg = resolve_config(load_params(TINY, ["save_strategy=no", "deepspeed=null"]))
    assert training_arguments(cfg, tmp_path, n_eval=0).save_strategy == "no"


@pytest.mark.parametrize("text", ["lora_r", "=5", " =5", "lora_target_modules=[q_proj, v_proj", "x={a: 1",
                                  "x=\"unclosed"])
def test_garbled_override_is_clear_error(text):
    with pytest.raises(ActionftError, match=re.escape(repr(text))):
        load_params(TINY, [text])


def test_unknown_key_is_rejected():
    from actionft.train import resolve_config

    cfg = load_params(TINY, ["lora_rr=8"])  # a typo of lora_r
    try:
        resolve_config(cfg)
    except ActionftError as err:
        assert "lora_rr" in str(err)
        return
    raise AssertionError("an unknown parameter was accepted without a word")


def test_every_notebook_parameter_is_known():
    """A params file may carry any notebook's parameter: each one is a training key or listed in OTHER_KEYS."""
    from actionft.notebooks import list_notebooks, notebook_parameters
    from actionft.prepare import PREPARE_ARGS
    from actionft.train import DEFAULTS, OTHER_KEYS

    declared = set().union(*(notebook_parameters(nb) for nb in list_notebooks()))
    assert declared - set(DEFAULTS) - OTHER_KEYS == set()
    # the rest are `actionft prepare`'s own arguments
    assert OTHER_KEYS - declared - set(PREPARE_ARGS) == set(), "OTHER_KEYS lists a parameter nothing reads"


@pytest.mark.parametrize(("content", "why"), [
    ("- a\n- b\n", "must be a mapping"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_bad_params_file_is_clear_error(tmp_path, content, why):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ActionftError, match=why) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_missing_params_file_is_clear_error(tmp_path):
    with pytest.raises(ActionftError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


# -- notebooks vs the embedded defaults -----------------------------------------------------------------------
@pytest.mark.parametrize("notebook", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_defaults_are_the_embedded_run(notebook):
    """A notebook run without parameters is the embedded run: its parameters cell restates config's defaults. The one
    exception: params/tiny.yaml (`make demo`) trains 20 epochs, the notebooks' default (what nbval runs) 10."""
    from actionft.train import DEFAULTS

    embedded = config.validate(load_params(TINY))
    assert (embedded["num_train_epochs"], DEFAULTS["num_train_epochs"]) == (20, 10)
    embedded["num_train_epochs"] = DEFAULTS["num_train_epochs"]
    declared = notebook_parameters(notebook)
    assert declared, f"{notebook.name} declares no parameters"
    # the parameters cell holds literals only, so every default evaluates on its own
    defaults = {k: ast.literal_eval(v) for k, v in declared.items()}
    resolved = config.validate(defaults)
    shared = sorted(set(defaults) & set(DEFAULTS))
    assert "run_name" in shared and len(shared) >= 5, shared
    differ = {k: (resolved[k], embedded[k]) for k in shared if resolved[k] != embedded[k]}
    assert not differ, f"{notebook.name} defaults (left) differ from the embedded run (right): {differ}"


# -- the reference run ----------------------------------------------------------------------------------------
REFERENCE_VALUES = {  # seed_run.md, "Model and adapter" and "Training setup"
    "model_id": "google/gemma-4-e4b-it",
    "num_frames": 4,
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "image_encoder_lr": 0.0,
    "projector_lr": 0.0,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 8,
    "learning_rate": 2e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "gradient_checkpointing": True,
    "bf16": True,
    "optim": "paged_adamw_8bit",
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 2,
    "logging_steps": 10,
    "dataloader_num_workers": 4,
    "val_fraction": 0.0,  # the reference held nothing out
    "test_fraction": 0.0,
}


def test_reference_params_hold_reference_values():
    params = load_params(REFERENCE)
    differ = {k: (params.get(k), v) for k, v in REFERENCE_VALUES.items() if params.get(k) != v}
    assert not differ, f"{REFERENCE.name} (left) vs the reference run (right): {differ}"
    assert isinstance(params["learning_rate"], float)


# training keys the reference file may leave to the defaults: they mean the same in both runs
SAME_IN_BOTH_RUNS = {
    "synth_clips_per_class", "synth_val_per_class", "synth_test_per_class", "synth_seed", "synth_frame_size",
    "video_max_soft_tokens", "max_train_samples", "max_eval_samples", "load_in_4bit", "padding_side",
    "supervised_logits_only", "resume_from_checkpoint", "report_to", "num_processes",
}


def test_reference_params_set_every_setting_that_makes_the_run():
    """The defaults are the embedded run's: a training key the reference file leaves out would take a tiny value."""
    from actionft.train import DEFAULTS

    params = load_params(REFERENCE)
    unset = set(DEFAULTS) - set(params) - SAME_IN_BOTH_RUNS
    assert not unset, f"{REFERENCE.name} leaves {sorted(unset)} to the embedded run's defaults: set them"
    embedded = config.validate({})
    assert all(config.validate(params)[k] == embedded[k] for k in SAME_IN_BOTH_RUNS)


def test_reference_deepspeed_config_is_zero2():
    params = load_params(REFERENCE)
    ds = json.loads((ROOT / params["deepspeed"]).read_text())
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    assert zero["reduce_bucket_size"] == 5e7 and ds["gradient_clipping"] == 1.0
    # "auto" takes the Trainer's values, which are the params file's (bf16 true, batch 1 x 8)
    assert ds["bf16"]["enabled"] in (True, "auto")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        assert ds[key] == "auto"


def test_reference_optimizer_steps():
    """3,115 clips, batch 1 x accumulation 8, 3 epochs: the reference's 1,170 optimizer steps."""
    from actionft.train import optimizer_steps, resolve_config

    cfg = resolve_config(load_params(REFERENCE))
    assert optimizer_steps(3115, cfg, n_processes=1) == 1170


def test_reference_params_match_seed_run_launch_line():
    """Every flag of the reference launch command that is also a parameter here has the same value."""
    if not SEED_RUN.is_file():
        pytest.skip(f"{SEED_RUN} is absent")
    text = " ".join(SEED_RUN.read_text().split())
    launch = text[text.index("Launch:"):]
    flags = dict(re.findall(r"--(\w+) ([^\s`-][^\s`]*)", launch))
    params = load_params(REFERENCE)
    # placeholders (`--model_id ...`, `--deepspeed <config>`) carry no value to compare
    compared = {k: v for k, v in flags.items() if k in params and v != "..." and not v.startswith("<")}
    assert len(compared) >= 18, compared
    differ = {}
    for key, raw in compared.items():
        value = {"True": True, "False": False}.get(raw, raw)
        value = yaml.safe_load(str(value)) if isinstance(value, str) else value
        value = float(raw) if isinstance(params[key], float) else value
        if value != params[key]:
            differ[key] = (params[key], raw)
    assert not differ, f"{REFERENCE.name} (left) vs the launch command (right): {differ}"
    assert "zero2.json" in params["deepspeed"]


def test_extends_starts_from_another_file(tmp_path):
    from actionft.params import load_params

    (tmp_path / "base.yaml").write_text("run_name: base\nlora_r: 16\nsave_strategy: no\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun_name: child\n")
    assert load_params(tmp_path / "child.yaml", ["lora_r=8"]) == {"run_name": "child", "lora_r": 8,
                                                                  "save_strategy": "no"}
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ActionftError, match="extends itself"):
        load_params(tmp_path / "loop.yaml")


def test_qlora_params_are_the_reference_with_a_4bit_base():
    from actionft.params import load_params

    reference = load_params(ROOT / "params" / "gemma4_e4b_kinetics3k.yaml")
    qlora = load_params(ROOT / "params" / "gemma4_e4b_qlora.yaml")
    assert qlora.pop("load_in_4bit") is True and qlora.pop("run_name") != reference.pop("run_name")
    assert qlora == reference


# -- notebooks read their parameters through session.configure ------------------------------------------------
def _bound_names(tree) -> set[str]:
    """Names a cell binds at notebook level: assignments, loops, with/except targets, imports, defs, walrus (not
    the locals of functions, classes and comprehensions, which leave the notebook's names alone)."""
    names: set[str] = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.NamedExpr):
            names.add(node.target.id)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return names


def test_bound_names_sees_every_kind_of_binding():
    code = ("import a.b as size\nfrom x import seed\nworkers = 1\nfor batch_size in []: pass\nwith f() as (n_show, k): "
            "pass\nif (max_clips := 3): pass\ndef lora_r(): run_name = 1\n[synth for synth in []]\n")
    assert _bound_names(ast.parse(code)) == {"size", "seed", "workers", "batch_size", "n_show", "k", "max_clips",
                                             "lora_r"}


@pytest.mark.parametrize("notebook", list_notebooks(), ids=lambda p: p.stem)
def test_no_cell_rebinds_a_parameter(notebook):
    """session.configure(globals()) reads the parameters from the notebook's names: a later cell that re-binds one
    (`size = ...`, `from actionft import synth`) would change what a re-run of the setup cell reads."""
    import nbformat

    from actionft.config import SECTION_OF

    nb = nbformat.read(str(notebook), as_version=4)
    rebound = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            clash = _bound_names(ast.parse(cell.source)) & set(SECTION_OF)
            if clash:
                rebound[f"cell {i}"] = sorted(clash)
    assert not rebound, f"{notebook.name} re-binds parameter names (rename the variables): {rebound}"


@pytest.mark.parametrize("notebook", list_notebooks(), ids=lambda p: p.stem)
def test_setup_cell_is_one_configure_call(notebook):
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    assert nb.cells[i + 1].source.startswith("cfg, run = session.configure(globals())\n") or \
        nb.cells[i + 1].source == "cfg, run = session.configure(globals())"
    later = "\n".join(c.source for c in nb.cells[i + 2:] if c.cell_type == "code")
    assert "session.configure" not in later and "resolve_config(" not in later


def test_training_notebook_declares_every_training_parameter():
    """`actionft run` passes a notebook only the parameters it declares: 04 declares every training parameter, so
    load_in_4bit, report_to, attn_implementation ... of a params file reach training."""
    from actionft.config import SECTIONS, TRAIN_SECTIONS

    declared = notebook_parameters(next(nb for nb in list_notebooks() if nb.name.startswith("04")))
    missing = [k for s in TRAIN_SECTIONS for k in SECTIONS[s].model_fields if k not in declared]
    assert not missing, missing

"""session.configure: a notebook's parameters (its names that are configuration keys) become the checked
configuration in one call, with the same one-line errors as the command line."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from actionft import session
from actionft.errors import ActionftError


def notebook_namespace(tmp_path, **params):
    """What globals() holds after a notebook's parameters cell: its imports, IPython's names and the parameters."""
    return {"__name__": "__main__", "In": ["", "import numpy as np"], "Out": {}, "_": None, "_i1": "import numpy",
            "np": np, "session": session, "run_name": "t", "output_root": str(tmp_path), "synth": True,
            "data_path": "outputs/data/synth/data.json", **params}


def test_values_flow_through(tmp_path):
    cfg, run = session.configure(notebook_namespace(tmp_path, lora_r=8, learning_rate="1e-3", semantic=False,
                                                    n_show=3, size=224, seed=7))
    assert run == tmp_path / "t" and run.is_dir()
    assert cfg["lora_r"] == 8 and cfg["learning_rate"] == 1e-3 and cfg["semantic"] is False
    assert cfg["n_show"] == 3 and cfg["size"] == 224  # the evaluation and prepare sections come along
    assert cfg["lora_alpha"] == 128 and cfg["eval_split"] is None  # what the notebook leaves out: the defaults
    assert "np" not in cfg and "In" not in cfg
    seeded = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert seeded == (random.random(), np.random.rand(), torch.rand(1).item())


@pytest.mark.parametrize(("params", "message"), [
    ({"lora_rr": 8}, "unknown parameter 'lora_rr' (did you mean lora_r?)"),
    ({"lora_dropout": 1.5}, "lora_dropout=1.5: input should be less than 1"),
    ({"max_soft_tokens": 100}, "max_soft_tokens=100"),
    ({"optim": "adamw_torhc"}, "optim='adamw_torhc': not one transformers knows (closest: adamw_torch"),
    ({"synth": False, "data_path": None}, "set data_path and image_folder"),
])
def test_a_bad_parameter_is_one_line(tmp_path, params, message):
    with pytest.raises(ActionftError) as err:
        session.configure(notebook_namespace(tmp_path, **params))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "t").exists()  # nothing made before the configuration holds


def test_a_notebook_without_a_dataset_needs_no_data_path(tmp_path):
    """Notebook 00 writes a dataset and declares no data_path: synth false is fine there."""
    namespace = notebook_namespace(tmp_path, synth=False, video_dir="clips", annotations="a.csv")
    del namespace["data_path"]
    cfg, _ = session.configure(namespace)
    assert cfg["video_dir"] == "clips" and cfg["data_path"] is None

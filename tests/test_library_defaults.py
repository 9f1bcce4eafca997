"""The library's defaults are `make train`'s recipe: models.build(family, variant) and AllConvModule(net) with
nothing else given build and train what conf/train.yaml composes (model all_cnn_c, optim sgd_paper, cifar10).

Each side is read, never typed here: a default changed in conf/ or in the code alone fails a test.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from omegaconf import OmegaConf

from allconv import models, training
from allconv.module import AllConvModule

# Keys of the config that are not the network's or the optimiser's defaults to compare: which network (the
# model group's choice), and the two settings of how it runs, which are AllConvModule's arguments.
CHOICE = {"family", "variant"}
RUN = {"compile", "channels_last"}
# Arguments of models.build that conf/ does not hold: the data's (num_classes comes from the data config).
DATA_ARGUMENTS = {"num_classes", "in_channels"}


@pytest.fixture(scope="module")
def recipe():
    from hydra import compose, initialize_config_dir

    from conftest import CONF

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train")


def defaults(fn) -> dict:
    return {name: p.default for name, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_build_defaults_are_the_model_config_key_by_key(recipe):
    build = defaults(models.build)
    model = dict(recipe.model)
    assert set(model) - CHOICE - RUN == set(build) - DATA_ARGUMENTS  # no key on one side only
    for key in set(build) - DATA_ARGUMENTS:
        assert build[key] == model[key] and type(build[key]) is type(model[key]), key
    assert build["num_classes"] == recipe.data.num_classes and build["in_channels"] == 3


def test_module_defaults_are_the_optim_config_key_by_key(recipe):
    module = defaults(AllConvModule.__init__)
    optim = OmegaConf.to_container(recipe.optim)
    assert set(module) - {"num_classes", "config"} - RUN == set(optim)  # no key on one side only
    for key in optim:
        value = list(module[key]) if key == "milestones" else module[key]  # a tuple default: immutable
        assert value == optim[key] and type(value) is type(optim[key]), key
    for key in RUN:
        assert module[key] == recipe.model[key], key
    assert module["num_classes"] == recipe.data.num_classes and module["config"] is None


def test_the_default_network_is_the_one_make_train_builds(recipe):
    assert (recipe.model.family, recipe.model.variant) == ("c", "allcnn")
    torch.manual_seed(0)
    mine = models.build("c", "allcnn").state_dict()
    torch.manual_seed(0)
    theirs = models.build(**training.net_kwargs(recipe), num_classes=recipe.data.num_classes).state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_the_default_module_is_the_one_make_train_trains(recipe):
    torch.manual_seed(0)
    mine = AllConvModule({"family": "c", "variant": "allcnn"})
    torch.manual_seed(0)
    theirs = training.build_module(recipe)
    plain = {k: v for k, v in theirs.hparams.items() if k not in ("net", "config")}
    assert {k: mine.hparams[k] for k in plain} == {**plain, "milestones": tuple(plain["milestones"])}
    assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True))
    assert (mine.lr, mine.momentum, mine.weight_decay, mine.milestones, mine.gamma, mine.nesterov,
            mine.max_update_norm, mine.channels_last) == \
        (theirs.lr, theirs.momentum, theirs.weight_decay, theirs.milestones, theirs.gamma, theirs.nesterov,
         theirs.max_update_norm, theirs.channels_last)
    assert next(mine.net.parameters()).is_contiguous(memory_format=torch.channels_last)

"""Loading and chat-template errors are one-line EdgephiErrors, never crashes in the kernels."""

import json
import shutil

import pytest

import edgephi
from edgephi.convert import convert
from edgephi.chat_template import ChatTemplate
from edgephi.errors import EdgephiError, ModelFormatError


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("errors") / "m"
    convert(checkpoint_factory("phi3_basic"), out, quant="q8_0")
    return out


def test_recipe_that_disagrees_with_the_stored_planes_is_refused(model_dir, tmp_path):
    bad = tmp_path / "m"
    shutil.copytree(model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["tensors"]["layers.1.down"]["format"] = "q4_0"  # the file holds q8_0 planes
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFormatError, match="layers.1.down.qs"):
        edgephi.load(bad)


def test_chat_templates_get_transformers_loop_controls_and_clear_errors(model_dir):
    model = edgephi.load(model_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    first_only = "{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}"
    template = ChatTemplate(first_only, model.tokenizer, model.generation_config)
    assert template.render(messages, False) == "a"
    with pytest.raises(EdgephiError, match="chat template"):
        ChatTemplate("{% for m in messages %}", model.tokenizer, model.generation_config)
    failing = ChatTemplate("{{ raise_exception('only user and assistant roles') }}", model.tokenizer,
                           model.generation_config)
    with pytest.raises(EdgephiError, match="only user and assistant roles"):
        failing.encode(messages)

"""The LoRA guide lorakit implements (shared/seeds: a PEFT course chapter) runs on lorakit with only the
import lines changed.

Each snippet below is the guide's code verbatim except for its `from peft import ...` (and, where the
guide relies on transformers features that transformers 5 removed, `from transformers import
AutoModelForCausalLM`) lines, which import from lorakit instead. The guide's placeholder names
("<base_model_name>", "path/to/adapter", ...) are replaced by local paths before the code runs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import lorakit

LOAD_ADAPTER = '''
from transformers import AutoModelForCausalLM
from lorakit import PeftModel

base_model = AutoModelForCausalLM.from_pretrained("<base_model_name>")
peft_model_id = "<peft_adapter_id>"
model = PeftModel.from_pretrained(base_model, peft_model_id)
'''

TRL_CONFIG = '''
from lorakit import LoraConfig
from lorakit import AutoModelForCausalLM

# Load model with PEFT config
lora_config = LoraConfig(
    r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    bias="none",
    task_type="CAUSAL_LM"
)

# Load model on specific device
model = AutoModelForCausalLM.from_pretrained(
    "your-model-name",
    load_in_8bit=True,  # Optional: use 8-bit precision
    device_map="auto",
    peft_config=lora_config
)
'''

MERGE = '''
import torch
from transformers import AutoModelForCausalLM
from lorakit import PeftModel

# 1. Load the base model
base_model = AutoModelForCausalLM.from_pretrained(
    "base_model_name",
    torch_dtype=torch.float16,
    device_map="auto"
)

# 2. Load the PEFT model with adapter
peft_model = PeftModel.from_pretrained(
    base_model,
    "path/to/adapter",
    torch_dtype=torch.float16
)

# 3. Merge adapter weights with base model
try:
    merged_model = peft_model.merge_and_unload()
except RuntimeError as e:
    print(f"Merging failed: {e}")
    # Implement fallback strategy or memory optimization

# 4. Save the merged model
merged_model.save_pretrained("path/to/save/merged_model")
'''

SAVE_TOKENIZER = '''
# Save both model and tokenizer
tokenizer = AutoTokenizer.from_pretrained("base_model_name")
merged_model.save_pretrained("path/to/save/merged_model")
tokenizer.save_pretrained("path/to/save/merged_model")
'''


def _run(snippet: str, names: dict[str, str], namespace: dict | None = None) -> dict:
    code = textwrap.dedent(snippet)
    for placeholder, value in names.items():
        code = code.replace(f'"{placeholder}"', repr(value))
    namespace = {} if namespace is None else namespace
    exec(compile(code, "<guide>", "exec"), namespace)  # noqa: S102 - the guide's own code, verbatim
    return namespace


@pytest.fixture()
def adapter_dir(tmp_path: Path, tiny_chat_model_dir: Path) -> Path:
    """A trained-looking adapter (random, non-zero update) for the tiny chat model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = lorakit.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir),
        lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_loading_an_adapter(tiny_chat_model_dir: Path, adapter_dir: Path) -> None:
    ns = _run(
        LOAD_ADAPTER, {"<base_model_name>": str(tiny_chat_model_dir), "<peft_adapter_id>": str(adapter_dir)}
    )
    model = ns["model"]
    assert isinstance(model, lorakit.PeftModel) and model.active_adapter == "default"
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert (adapted - base).abs().max() > 1e-4
    # The guide's next steps: switch adapters with load_adapter/set_adapter, go back to the base with unload.
    model.load_adapter(adapter_dir, adapter_name="other")
    model.set_adapter("other")
    assert model.active_adapter == "other"
    restored = model.unload()
    assert type(restored.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_loading_in_8bit_with_a_peft_config(tiny_chat_model_dir: Path) -> None:
    ns = _run(TRL_CONFIG, {"your-model-name": str(tiny_chat_model_dir)})
    model = ns["model"]
    assert isinstance(model, lorakit.PeftModel)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear8bitLt"
    assert model.peft_config["default"].r == 16 and model.peft_config["default"].lora_alpha == 32
    trainable, total = model.get_nb_trainable_parameters()
    assert 0 < trainable < total
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_merging_and_saving(tmp_path: Path, tiny_chat_model_dir: Path, adapter_dir: Path) -> None:
    names = {"base_model_name": str(tiny_chat_model_dir), "path/to/adapter": str(adapter_dir),
             "path/to/save/merged_model": str(tmp_path / "merged")}
    ns = _run(MERGE, names)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ns["AutoTokenizer"] = AutoTokenizer  # the guide's tokenizer snippet uses it without importing it
    _run(SAVE_TOKENIZER, names, ns)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float16)
    reference = lorakit.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_chat_model_dir, dtype=torch.float16), adapter_dir
    )
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits.float() - reference(input_ids=ids).logits.float()).abs().max()
    assert merged.dtype == torch.float16 and gap < 1e-2
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert not any("lora" in name for name, _ in merged.named_parameters())

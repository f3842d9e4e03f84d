"""Export for other runtimes: GGUF (llama.cpp, Ollama, LM Studio), merged models and LoRA adapters.

    export_gguf(base, "model.gguf", adapters=["runs/x/adapter"], type="q8_0")   # merged, streamed
    export_adapter_gguf(base, "runs/x/adapter", "adapter.gguf")                   # llama.cpp --lora

See docs/export.md.
"""

from lorakit.export.adapter import export_adapter_gguf
from lorakit.export.model import export_gguf
from lorakit.export.writer import ExportReport

__all__ = ["ExportReport", "export_adapter_gguf", "export_gguf"]

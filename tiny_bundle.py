"""Tiny models of the real architectures, built in process: the one place the test kit lives.

No Hub, no downloads. Tokenizers are trained in process on the repository's real ROCO captions:
a WordPiece tokenizer for GIT (lower-cased, BERT special tokens, no ``token_type_ids``) and a
byte-level BPE tokenizer for LLaMA (``<s>``, ``</s>``, ``<unk>``, ``<pad>``, and a chat template so
the merged LM can be served by OpenAI-compatible servers). Tests, the demo and the benchmarks call
``build_bundle`` / ``save_bundle``; the sizes are parameters so benchmarks can build larger models.

    python tiny_bundle.py OUTPUT_DIR [--with-chart-reader]
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
from pathlib import Path

import torch

from modeling_visual_med_alpaca import (
    ALPACA_CHAT_TEMPLATE,
    PROMPT_TEMPLATES,
    VisualMedAlpacaConfig,
    VisualMedAlpacaModel,
)

REPO_ROOT = Path(__file__).resolve().parent
ROCO_CAPTIONS_CSV = REPO_ROOT / "data" / "roco" / "roco_val_captions.csv"
VQA_RAD_DIR = REPO_ROOT / "data" / "vqa_rad_dev"


@functools.lru_cache(maxsize=1)
def roco_captions(limit: int | None = None) -> tuple[str, ...]:
    """Real ROCO captions, stripped of the spaces/newlines the CSV wraps them in."""
    with ROCO_CAPTIONS_CSV.open(newline="", encoding="utf-8") as handle:
        captions = [row["caption"].strip() for row in csv.DictReader(handle)]
    captions = [c for c in captions if c]
    return tuple(captions[:limit] if limit else captions)


def _training_corpus() -> list[str]:
    # Every template with its fields left empty (format_map: templates differ in which fields they have).
    templates = [t.format_map(collections.defaultdict(str)) for t in PROMPT_TEMPLATES.values()]
    return templates * 20 + list(roco_captions())


def build_git_processor(image_size: int = 32, vocab_size: int = 1000):
    """GitProcessor = a WordPiece BertTokenizer trained on ROCO captions + a CLIP image processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizer, CLIPImageProcessor, GitProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(
        roco_captions(),
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False),
        length=None,
    )
    vocab = backend.get_vocab()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    backend.decoder = decoders.WordPiece()
    # GIT must not receive token_type_ids (DESIGN.md §4).
    tokenizer = BertTokenizer(vocab=vocab, model_input_names=["input_ids", "attention_mask"])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return GitProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_llama_tokenizer(vocab_size: int = 1000):
    """Byte-level BPE trained on the prompt templates and ROCO captions, with a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        _training_corpus(),
        trainers.BpeTrainer(
            show_progress=False,  # its progress bar writes to the terminal directly, past any redirection
            vocab_size=vocab_size,
            special_tokens=special,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    return tokenizer


def build_pix2struct_processor(vocab_size: int = 300, patch_size: int = 16):
    """Pix2StructProcessor (DePlot layout) with a small in-process tokenizer; ``is_vqa=False``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Pix2StructImageProcessor, Pix2StructProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(
        ["TITLE | year | value <0x0A> 2019 | 12.5 <0x0A> 2020 | 13.1"] * 10 + list(roco_captions(500)),
        trainers.BpeTrainer(
            show_progress=False,  # its progress bar writes to the terminal directly, past any redirection
            vocab_size=vocab_size,
            special_tokens=["<pad>", "</s>", "<unk>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    from tokenizers import decoders

    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    image_processor = Pix2StructImageProcessor(is_vqa=False, patch_size={"height": patch_size, "width": patch_size})
    return Pix2StructProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_zero_shot_classifier(output_dir, labels, seed: int = 0) -> Path:
    """A tiny CLIP (``zero-shot-image-classification``) with an in-process tokenizer, saved to ``output_dir``.

    ``labels`` are the texts it will be asked about (they train the tokenizer); used to test the router's
    zero-shot mode, which accepts any such model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(
        [*labels, "This is a photo of {}."] * 5,
        trainers.BpeTrainer(
            show_progress=False,  # its progress bar writes to the terminal directly, past any redirection
            vocab_size=300,
            special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    # CLIP pools the text at the end-of-text token: every text must end with one.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(output_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(output_dir)
    return Path(output_dir)


def build_llama_config(
    llama_tokenizer, *, hidden: int = 64, layers: int = 2, heads: int = 4, max_positions: int = 2048
):
    """The tiny Med-Alpaca language model's LlamaConfig (the bundle's text model and the training tests use it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(llama_tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=llama_tokenizer.pad_token_id,
        bos_token_id=llama_tokenizer.bos_token_id,
        eos_token_id=llama_tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_tiny_llama(seed: int = 0, llama_tokenizer=None, **sizes):
    """A standalone tiny ``LlamaForCausalLM`` and its tokenizer: the base model of the training tests and benchmark.

    ``sizes`` are those of ``build_llama_config`` (hidden, layers, heads, max_positions). Keep ``hidden`` and
    ``hidden * 2`` multiples of 64 so the 4-bit (nf4) path works on CPU.
    """
    from transformers import LlamaForCausalLM

    llama_tokenizer = llama_tokenizer or build_llama_tokenizer()
    config = build_llama_config(llama_tokenizer, **sizes)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval(), llama_tokenizer


def save_tiny_llama(output_dir, seed: int = 0, **sizes) -> Path:
    """Save ``build_tiny_llama`` as a folder any ``--model_name_or_path`` accepts."""
    model, llama_tokenizer = build_tiny_llama(seed=seed, **sizes)
    model.save_pretrained(output_dir)
    llama_tokenizer.save_pretrained(output_dir)
    return Path(output_dir)


def build_git_config(git_processor, *, git_hidden: int = 32, git_layers: int = 2, image_size: int = 32):
    """The tiny GitConfig recipe (Med-GIT's architecture at test size), sized to ``git_processor``'s tokenizer."""
    from transformers import GitConfig

    git_tokenizer = git_processor.tokenizer
    return GitConfig(
        vision_config={
            "hidden_size": git_hidden,
            "intermediate_size": git_hidden * 2,
            "num_hidden_layers": git_layers,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": max(image_size // 8, 4),
            "num_channels": 3,
        },
        vocab_size=len(git_tokenizer),
        hidden_size=git_hidden,
        num_hidden_layers=git_layers,
        num_attention_heads=4,
        intermediate_size=git_hidden * 2,
        max_position_embeddings=128,
        pad_token_id=git_tokenizer.pad_token_id,
        bos_token_id=git_tokenizer.cls_token_id,
        eos_token_id=git_tokenizer.sep_token_id,
    )


def build_pix2struct_config(chart_processor):
    """The tiny Pix2StructConfig recipe (DePlot's architecture at test size), sized to ``chart_processor``."""
    from transformers import Pix2StructConfig

    chart_tokenizer = chart_processor.tokenizer
    patch_size = chart_processor.image_processor.patch_size["height"]
    return Pix2StructConfig(
        vision_config={
            "hidden_size": 32,
            # Each flattened patch is patch_size * patch_size * 3 pixel values (plus row/column ids).
            "patch_embed_hidden_size": patch_size * patch_size * 3,
            "d_ff": 64,
            "d_kv": 8,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": patch_size,
        },
        text_config={
            "vocab_size": len(chart_tokenizer),
            "hidden_size": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_layers": 2,
            "num_heads": 4,
            "pad_token_id": chart_tokenizer.pad_token_id,
            "eos_token_id": chart_tokenizer.eos_token_id,
            "decoder_start_token_id": chart_tokenizer.pad_token_id,
        },
        is_vqa=False,
    )


def build_chart_reader(seed: int = 0):
    """A tiny, randomly initialised DePlot: ``(Pix2StructForConditionalGeneration, Pix2StructProcessor)``."""
    from transformers import Pix2StructForConditionalGeneration

    chart_processor = build_pix2struct_processor()
    torch.manual_seed(seed)
    return Pix2StructForConditionalGeneration(build_pix2struct_config(chart_processor)).eval(), chart_processor


def build_captioner(seed: int = 0, **sizes):
    """A tiny, randomly initialised Med-GIT: ``(GitForCausalLM, GitProcessor)`` (for ``train_git.py`` tests)."""
    from transformers import GitForCausalLM

    git_processor = build_git_processor(image_size=sizes.get("image_size", 32))
    torch.manual_seed(seed)
    return GitForCausalLM(build_git_config(git_processor, **sizes)).eval(), git_processor


def build_config(
    git_processor,
    llama_tokenizer,
    chart_processor=None,
    *,
    git_hidden: int = 32,
    git_layers: int = 2,
    image_size: int = 32,
    llama_hidden: int = 64,
    llama_layers: int = 2,
    llama_heads: int = 4,
    max_positions: int = 2048,
) -> VisualMedAlpacaConfig:
    captioner_config = build_git_config(
        git_processor, git_hidden=git_hidden, git_layers=git_layers, image_size=image_size
    )
    text_config = build_llama_config(
        llama_tokenizer, hidden=llama_hidden, layers=llama_layers, heads=llama_heads, max_positions=max_positions
    )
    chart_config = build_pix2struct_config(chart_processor) if chart_processor is not None else None
    return VisualMedAlpacaConfig(
        captioner_config=captioner_config,
        text_config=text_config,
        chart_config=chart_config,
        caption_max_new_tokens=12,
        chart_max_new_tokens=16,
        chart_max_patches=64,
        answer_max_new_tokens=16,
        max_prompt_tokens=max_positions - 64,
    )


def build_bundle(seed: int = 0, with_chart_reader: bool = False, **sizes):
    """A tiny, randomly initialised bundle: ``(model, llama_tokenizer, git_processor, chart_processor)``."""
    git_processor = build_git_processor(image_size=sizes.get("image_size", 32))
    llama_tokenizer = build_llama_tokenizer()
    chart_processor = build_pix2struct_processor() if with_chart_reader else None
    config = build_config(git_processor, llama_tokenizer, chart_processor, **sizes)
    torch.manual_seed(seed)
    model = VisualMedAlpacaModel(config).eval()
    return model, llama_tokenizer, git_processor, chart_processor


def save_bundle(output_dir, model, llama_tokenizer, git_processor, chart_processor=None) -> Path:
    """Save a loadable bundle: weights, config with ``auto_map``/``custom_pipelines``, remote code, processors,
    and the Inference Endpoints files (``handler.py``, ``requirements.txt``)."""
    from publish_bundle import save_pipeline_bundle, write_endpoint_files

    folder = save_pipeline_bundle(output_dir, model, llama_tokenizer, git_processor, chart_processor)
    write_endpoint_files(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir")
    parser.add_argument("--with-chart-reader", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    parts = build_bundle(seed=args.seed, with_chart_reader=args.with_chart_reader)
    print(f"Tiny bundle saved to {save_bundle(args.output_dir, *parts)}")


if __name__ == "__main__":
    main()

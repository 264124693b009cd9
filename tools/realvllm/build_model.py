"""Builds the tiny random Llama that the real-vLLM test tier serves, with two LoRA adapters.

No weights can be downloaded here, so the model is made from nothing: a 2-layer Llama with random
weights (its output is gibberish, which is all a routing test needs), a byte-level BPE tokenizer
trained on text generated below, a role-tagged chat template, and two rank-8 LoRA adapters in
PEFT's file layout (written directly, so peft need not be installed). Every random choice has a
fixed seed: the same versions of torch/transformers/tokenizers build the same files.

Run with the vLLM venv's python (tools/realvllm/setup.sh does):

    python tools/realvllm/build_model.py OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

# Bump when anything below changes what is built: setup.sh rebuilds cached models on a change.
BUILDER_VERSION = "tiny-llama-1"

VOCAB_SIZE = 4096
HIDDEN = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 512
MAX_POSITIONS = 4096
LORA_RANK = 8
LORA_TARGETS = ("q_proj", "v_proj")
LORA_NAMES = ("lora-a", "lora-b")

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)

# One turn per message, "<|role|>\ncontent<|eos|>\n"; the generation prompt opens an assistant
# turn. The template adds BOS itself: vLLM tokenizes a rendered chat without special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORD_TEXT = (
    "the a an of to and in is it that for on with as was by at be this from or are not but have "
    "one all can had which we you they there his her their will would what so if about out up "
    "more time when who some into only other new like then than first been has could them "
    "request route router pod model token tokens block blocks cache prefix hash server client "
    "envoy vllm adapter lora queue load latency throughput stream chunk usage prompt completion "
    "chat message system user assistant tool answer question reply error retry header body "
    "metric metrics gauge counter histogram scrape score weight pick choose best least busy "
    "kv event events stored removed cleared memory page size seed sha cbor pickle byte bytes "
    "hello world quick brown fox jumps over lazy dog lorem ipsum dolor sit amet consectetur "
    "apple banana cherry river mountain ocean forest city street window garden music story "
    "red green blue yellow black white small large fast slow early late open close read write "
    "zero two three four five six seven eight nine ten hundred thousand million"
)
_WORDS = _WORD_TEXT.split()


def corpus(lines: int = 6000, seed: int = 1234) -> list[str]:
    """Deterministic pseudo-English (plus digits, punctuation, JSON-ish and code-ish lines) for
    training the tokenizer: varied enough that BPE learns a few thousand merges."""
    rng = random.Random(seed)
    out = []
    punct = [".", ",", "?", "!", ":", ";"]
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        line = " ".join(words) + rng.choice(punct)
        if i % 7 == 0:
            line = json.dumps({rng.choice(_WORDS): line, "n": i})
        if i % 11 == 0:
            line = f"def {rng.choice(_WORDS)}_{i}(x):\n    return x + {i}\n"
        out.append(line)
    return out


def build_tokenizer(out: Path) -> Any:
    """Trains a byte-level BPE (every byte is in the alphabet, so any text encodes) and wraps it
    as a transformers fast tokenizer; the post-processor prepends BOS to a plain prompt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    return fast


def build_model(out: Path, bos_id: int, eos_id: int, pad_id: int) -> None:
    """A random-weight Llama, saved in bfloat16 safetensors (what `--dtype bfloat16` serves)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        # A larger init than Llama's 0.02 makes the logits less flat, so greedy decoding does
        # not repeat one token forever and sampled outputs differ between adapters.
        initializer_range=0.08,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id).save_pretrained(
        str(out)
    )


def build_lora(out: Path, seed: int) -> None:
    """A rank-8 LoRA on q_proj and v_proj of every layer in PEFT's layout: adapter_config.json and
    adapter_model.safetensors with keys base_model.model.<module>.lora_{A,B}.weight. lora_B is
    random (PEFT would start it at zero), so each adapter visibly changes the output."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    out_dims = {"q_proj": HEADS * HEAD_DIM, "v_proj": KV_HEADS * HEAD_DIM}
    tensors: dict[str, Any] = {}
    for layer in range(LAYERS):
        for target in LORA_TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(LORA_RANK, HIDDEN, generator=gen) * 0.05
            b = torch.randn(out_dims[target], LORA_RANK, generator=gen) * 0.05
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "base_model_name_or_path": "tiny-llama",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 2 * LORA_RANK,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": LORA_RANK,
        "target_modules": list(LORA_TARGETS),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path, help="folder to write (created; must not hold a model)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    import tokenizers
    import torch
    import transformers

    fast = build_tokenizer(out)
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    build_model(out, ids[BOS], ids[EOS], ids[PAD])
    for i, name in enumerate(LORA_NAMES):
        build_lora(out / name, seed=100 + i)

    info = {
        "builder_version": BUILDER_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "tokenizer_vocab": len(fast),
        "special_token_ids": ids,
        "lora_adapters": list(LORA_NAMES),
    }
    (out / "extproc-builder.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    # Written last: setup.sh treats a folder with this marker as a complete, current build.
    (out / ".extproc-model-version").write_text(BUILDER_VERSION + "\n")
    print(json.dumps(info, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

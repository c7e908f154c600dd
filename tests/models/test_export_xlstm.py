"""Export to Hugging Face format: transformers loads our xLSTM as its native class, logits and greedy tokens match.

The tokenizer is a byte-level BPE trained here on a few strings (nothing is downloaded).
"""

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, xLSTMForCausalLM

from models import CausalLM, ModelConfig
from models.hf import export_hf, load_hf
from tests.models.test_xlstm import rel_err, tiny_cfg

TEXTS = ["def add(a, b):\n    return a + b\n", "The mLSTM keeps a matrix memory per head.", "hello world " * 5]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TEXTS, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def trained_model(cfg: ModelConfig, steps: int = 2) -> CausalLM:
    """Random init, then a few SGD steps so no weight (gate biases, norms) is still at its init value."""
    torch.manual_seed(0)
    model = CausalLM(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (4, 65))
        model(tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_loads_as_native_transformers_xlstm(tmp_path, tokenizer_file, tie):
    model = trained_model(tiny_cfg(tie_embeddings=tie))
    folder = export_hf(model, tmp_path / "hf", tokenizer_file=str(tokenizer_file))

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf) is xLSTMForCausalLM
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 37))
    with torch.no_grad():
        assert rel_err(model(tokens).logits, hf(tokens, use_cache=False).logits) < 1e-5
        assert rel_err(model(tokens[:, :1]).logits, hf(tokens[:, :1], use_cache=False).logits) < 1e-5

    # Greedy decoding: ours prefills then calls step; theirs runs its own cache. No early stop at EOS.
    prompt = tokens[:, :5]
    ours = model.generate(prompt, max_new_tokens=12)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(ours, theirs)

    # And back: load_hf gives the same weights (and the tie) we exported.
    loaded = load_hf(folder)
    assert loaded.cfg.model_dump(exclude={"init_std"}) == model.cfg.model_dump(exclude={"init_std"})
    for (name, ours_p), (_, back) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(ours_p, back), name
    assert (loaded.lm_head.weight is loaded.embed.weight) == tie


def test_tokenizer_files_load_with_auto_tokenizer(tmp_path, tokenizer_file):
    folder = export_hf(trained_model(tiny_cfg(), steps=0), tmp_path / "hf", tokenizer_file=str(tokenizer_file))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    reference = Tokenizer.from_file(str(tokenizer_file))
    text = "def add(a, b): hello"
    assert tokenizer(text)["input_ids"] == reference.encode(text).ids
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|padding|>"
    config = AutoModelForCausalLM.from_pretrained(folder).config
    assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_export_refuses_a_hybrid_naming_its_layers(tmp_path):
    model = CausalLM(tiny_cfg(pattern="XA"))  # mLSTM and attention layers: no single transformers class
    with pytest.raises(ValueError, match="no Hugging Face export for layers \\['attention', 'mlstm'\\]"):
        export_hf(model, tmp_path / "hf")

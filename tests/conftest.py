import os

# Triton decides between its CPU interpreter and compiled kernels when a function is decorated, and
# triton.language's own helpers (tl.sum, tl.max, ...) are decorated when triton.language is first
# imported, which torch may do early (torch.func imports Triton-backed ops). So the interpreter mode is
# chosen here, before anything imports torch: the kernel tests run under it on this CPU. It changes
# nothing else: the layers use Triton only for CUDA tensors or an explicit backend="triton".
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests work on small tensors, where one thread is faster than two fighting over the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def word_tokenizer(tmp_path):
    """``make(texts) -> (folder, vocab)``: a small Hugging Face tokenizer with its own end-of-text token
    (``</s>``, id 1) over the words of ``texts``, saved to a folder (no download)."""

    def make(texts):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        words = sorted({w for t in texts for w in t.split()})
        vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
        fast.save_pretrained(str(tmp_path / "word-tokenizer"))
        return str(tmp_path / "word-tokenizer"), vocab

    return make

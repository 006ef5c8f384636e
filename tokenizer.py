"""The tokenizer of a Hugging Face checkpoint folder (tokenizer.json, through the `tokenizers`
library) and the chat formats of the three supported families: Qwen2.5's ChatML (with its default
system prompt), Qwen3's (ChatML, thinking off) and Llama 3's header format. `load_tokenizer` also
collects the end-of-turn ids that stop sampling (model.generate) and picks the pad id: Qwen's pad
and end-of-text share an id, so masks are built from lengths, never from pad ids (docs/architecture.md).
"""

import json
import os
from dataclasses import dataclass

from model import CheckpointError

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN3_NO_THINKING = "<think>\n\n</think>\n\n"  # what Qwen3's template writes with enable_thinking=False
CHAT_FORMATS = {"qwen2": "qwen2.5", "qwen3": "qwen3", "llama": "llama3"}  # model_type -> chat format
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")  # Qwen's, then Llama 3's


def chatml_prompt(user, system):
    """Qwen's ChatML prompt, ending with the assistant header; system None: no system turn."""
    head = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def llama3_prompt(user, system):
    """Llama 3's chat prompt (its template strips each message), ending with the assistant header."""
    head = "" if system is None else f"<|start_header_id|>system<|end_header_id|>\n\n{system.strip()}<|eot_id|>"
    return (f"<|begin_of_text|>{head}<|start_header_id|>user<|end_header_id|>\n\n{user.strip()}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


@dataclass
class Tokenizer:
    """`tokenizers.Tokenizer` plus what sampling needs: chat prompt, end-of-turn ids, pad id (load_tokenizer)."""

    tok: object  # a tokenizers.Tokenizer
    end_ids: list  # generation stops at any of these; the end token is part of the completion
    pad_id: int  # fills rows after their end (never used to build masks)
    chat_format: str = "qwen2.5"  # one of CHAT_FORMATS' values

    @property
    def vocab_size(self):
        return self.tok.get_vocab_size()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token):
        return self.tok.token_to_id(token)

    def chat_prompt(self, user, system=None):
        """The prompt in the family's chat format. system None: the family's default, which is
        Qwen2.5's system prompt for Qwen2.5 and no system turn for Llama 3 and Qwen3. Qwen3 answers
        without thinking (GSM8K completions stay short, as with Qwen2.5)."""
        if self.chat_format == "llama3":
            return llama3_prompt(user, system)
        if self.chat_format == "qwen3":
            return chatml_prompt(user, system) + QWEN3_NO_THINKING
        return chatml_prompt(user, QWEN_DEFAULT_SYSTEM if system is None else system)

    def encode_chat(self, user, system=None):
        return self.encode(self.chat_prompt(user, system))


def load_tokenizer(path):
    """tokenizer.json of a checkpoint folder; the chat format from config.json's model_type (else Llama 3's
    if its header tokens exist, else Qwen2.5's); end ids: the family's end-of-turn tokens and every
    eos_token_id of generation_config.json and config.json."""
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: missing; the tokenizer is read from tokenizer.json")
    try:
        tok = HFTokenizer.from_file(file)
    except Exception as e:  # the tokenizers library raises bare Exceptions for malformed files
        raise CheckpointError(f"{file}: not a valid tokenizers file: {e}") from None
    end_ids = [tok.token_to_id(t) for t in END_TOKENS if tok.token_to_id(t) is not None]
    chat_format = "llama3" if tok.token_to_id("<|start_header_id|>") is not None else "qwen2.5"
    for name in ("generation_config.json", "config.json"):
        extra = os.path.join(path, name)
        if os.path.isfile(extra):
            try:
                with open(extra) as f:
                    c = json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{extra}: not valid JSON ({e}); re-download it") from None
            if not isinstance(c, dict):
                raise CheckpointError(f"{extra}: expected a JSON object; re-download it")
            eos = c.get("eos_token_id")
            end_ids += [eos] if isinstance(eos, int) else list(eos or [])
            chat_format = CHAT_FORMATS.get(c.get("model_type"), chat_format)
    end_ids = list(dict.fromkeys(end_ids))  # de-duplicated, order kept
    if not end_ids:
        raise CheckpointError(f"{file}: no end-of-turn token ({', '.join(END_TOKENS)}) and no eos_token_id in the configs")
    pads = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|end_of_text|>") if tok.token_to_id(t) is not None]
    return Tokenizer(tok, end_ids, pads[0] if pads else end_ids[-1], chat_format)

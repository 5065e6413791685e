"""Processor + model together: a spoken prompt through the chat template, generate, stream, decode."""

import threading

import torch

from fun_audio_chat import (
    FunAudioChatForConditionalGeneration,
    FunAudioChatIteratorStreamer,
    SpeechEvent,
    TextEvent,
    tiny_processor,
)
from fun_audio_chat.processing import example_audio_path
from fun_audio_chat.tiny import tiny_config


def _conversation(text=None):
    content = [{"type": "audio", "path": str(example_audio_path())}]
    if text:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def test_streamed_text_pieces_and_speech_reassemble_the_decoded_reply():
    torch.manual_seed(0)
    processor = tiny_processor()
    model = FunAudioChatForConditionalGeneration(tiny_config()).eval()
    inputs = processor.apply_chat_template(
        [_conversation(), _conversation("Answer briefly.")],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        speech_output=True,
    )
    streamer = FunAudioChatIteratorStreamer(processor.tokenizer, timeout=120)
    holder = {}
    kwargs = dict(
        **inputs,
        max_new_tokens=12,
        do_sample=False,
        force_audio_bos=True,
        speech_do_sample=False,
        return_dict_in_generate=True,
        streamer=streamer,
    )

    def run():
        try:
            holder["out"] = model.generate(**kwargs)
        finally:
            streamer.end()  # never leave the consumer waiting, even if generate raised

    thread = threading.Thread(target=run)
    thread.start()
    events = list(streamer)
    thread.join()
    out = holder["out"]
    prompt_len = inputs["input_ids"].shape[1]
    for row in range(2):
        pieces = "".join(e.text for e in events if isinstance(e, TextEvent) and e.row == row)
        new_tokens = out.sequences[row, prompt_len:]
        assert pieces == processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
        codes = [c for e in events if isinstance(e, SpeechEvent) and e.row == row for c in e.codes]
        assert codes == out.speech_ids[row][out.speech_attention_mask[row].bool()].tolist()
        assert len(codes) == 5 * (len(new_tokens) - 1)  # every step after the forced <|audio_bos|> speaks
    decoded = processor.decode_speech(out.speech_ids, out.speech_attention_mask)
    assert len(decoded) == 2 and all(0 <= c < 296 for row in decoded for c in row)

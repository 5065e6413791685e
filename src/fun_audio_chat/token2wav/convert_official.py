"""Convert an official CosyVoice 3 checkpoint (``cosyvoice3.yaml`` + ``flow.pt`` + ``hift.pt``) into a transformers
folder (``config.json`` + ``model.safetensors``) that :class:`~fun_audio_chat.CosyVoice3Detokenizer` and ``AutoModel``
load with ``from_pretrained``.

    python -m fun_audio_chat.token2wav.convert_official SRC OUT [--speaker-embedding FILE.safetensors]

(``fun-audio-chat convert-detokenizer`` runs the same conversion.) What happens:

* the yaml is read as data: only the known CosyVoice 3 classes of its ``flow:`` and ``hift:`` sections and their
  arguments are interpreted, ``!ref`` references (with ``+ - * /`` over numbers) are resolved, nothing is executed
  (:mod:`.loading`);
* ``flow.pt`` / ``hift.pt`` are read with ``torch.load(weights_only=True)`` and their keys renamed by the table in
  :mod:`.loading` (``_FLOW_RENAMES`` / ``_HIFT_RENAMES``, summarised in ``docs/token2wav.md``); the renaming is one
  to one and every key must land on a parameter of the model, or the conversion stops;
* the speaker embedding stored with the weights is Fun-Audio-Chat's default CAM++ voice, or the one given;
* the released speakers of a local SRC (``new_spk2info.pt`` / ``spk2info.pt``, also under ``utils/``) become voices
  with their full prompts in ``OUT/voices/<name>.safetensors`` (:func:`fun_audio_chat.voices.convert_official_speakers`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .loading import CheckpointFormatError, resolve_checkpoint
from .modeling_cosyvoice3 import CosyVoice3Detokenizer


def convert_official_checkpoint(
    source: str | os.PathLike, output_dir: str | os.PathLike, speaker_embedding=None
) -> CosyVoice3Detokenizer:
    """Read an official CosyVoice 3 folder (or Hub id of one), write the transformers folder; returns the model."""
    kind, _ = resolve_checkpoint(source)
    if kind != "official":
        raise CheckpointFormatError(f"{source}: already a converted folder (config.json + model.safetensors).")
    model = CosyVoice3Detokenizer.from_pretrained(source, speaker_embedding=speaker_embedding)
    model.save_pretrained(Path(output_dir))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SRC", help="official CosyVoice 3 folder or Hub id")
    parser.add_argument("out", metavar="OUT", help="output folder")
    parser.add_argument("--speaker-embedding", help="safetensors file with one (1, 192) CAM++ embedding")
    args = parser.parse_args(argv)
    speaker = None
    if args.speaker_embedding:
        from safetensors.torch import load_file

        speaker = next(iter(load_file(args.speaker_embedding).values()))
    try:
        model = convert_official_checkpoint(args.source, args.out, speaker)
    except (CheckpointFormatError, OSError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"wrote {args.out}/config.json and model.safetensors")
    from ..voices import convert_official_speakers, find_official_speakers  # voices build on this package

    if Path(args.source).is_dir() and find_official_speakers(args.source) is not None:
        try:
            written = convert_official_speakers(args.source, args.out, config=model.config)
        except (ValueError, OSError) as err:
            parser.exit(2, f"{parser.prog}: error: speakers of {args.source}: {err}\n")
        print(f"wrote {len(written)} voice(s) to {args.out}/voices/: {', '.join(path.stem for path in written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

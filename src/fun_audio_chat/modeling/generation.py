"""Generation for Fun-Audio-Chat (filled in below)."""


class FunAudioChatGenerationMixin:
    pass

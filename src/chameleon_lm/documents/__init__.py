"""Mixed-modal documents: ordered text and image parts, and their token sequences."""

from chameleon_lm.documents.document import (
    DecodeError, Document, DocumentCodec, EncodedDocument, ImagePart, TextPart,
)

__all__ = ["DecodeError", "Document", "DocumentCodec", "EncodedDocument", "ImagePart", "TextPart"]

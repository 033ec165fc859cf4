"""Text rules: tokenizers and vocabulary, chat templates and prompts, stop rules, region cells.

The lowest layer: its modules import nothing from the other sub-packages (`arch`, `decoding`, `io`)."""

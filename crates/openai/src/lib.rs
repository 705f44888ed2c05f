//! OpenAI API types as used by colocate: completions, chat, embeddings, streaming chunks, usage, error body.

"""Ray-free pieces of the reward server: request schemas, chat-template parsing, scoring service."""

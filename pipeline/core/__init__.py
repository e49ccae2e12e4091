"""The vocabulary every layer speaks: audio formats, the element and message types, table schemas, IDs, the row
rules and the errors that end a command. No Beam, no I/O; imports nothing of the pipeline but itself."""

"""The heads file: its schema (schema), writing it (writer), checking it from outside (check), and
exporting it to the layouts serving engines load (export)."""

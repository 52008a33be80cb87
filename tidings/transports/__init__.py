"""The abstraction layer every driver plugs into. Imports no driver and no broker library."""

"""The task stream: agents receive tasks over a WebSocket as they are created."""

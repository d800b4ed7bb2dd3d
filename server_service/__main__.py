"""``python -m server_service``: run the server from environment settings."""

from server_service.main import run

if __name__ == "__main__":
    run()

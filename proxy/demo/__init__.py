"""Small services shipped with meshproxy for the quickstart and the demo."""

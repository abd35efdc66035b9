"""`gptrain chat`: a Chainlit chat page serving one model (the optional extra gptrain[ui]).

cli.py checks the weights path and starts `chainlit run app.py` with the settings in
config.py; app.py loads the model and streams replies; reply.py shows generated text verbatim.
"""

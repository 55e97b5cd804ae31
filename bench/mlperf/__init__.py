"""The MLPerf Inference GPT-J benchmark (CNN/DailyMail summarization) on LoadGen: a query sample
library over `cnn_eval.json`, systems under test over the in-process generator and over the
HTTP server, and the accuracy script. See docs/serving.md."""

# Production image.
FROM python:3.12-slim
WORKDIR /app
COPY requirements*.txt ./
RUN if [ -f requirements.txt ]; then pip install --no-cache-dir -r requirements.txt; fi
COPY . .
ENV PORT={{port}} PYTHONUNBUFFERED=1
EXPOSE {{port}}
CMD ["python", {{main_json}}]

# Production image.
FROM node:20-slim
WORKDIR /app
COPY package*.json ./
RUN npm ci --omit=dev || npm install --omit=dev
COPY . .
ENV PORT={{port}} NODE_ENV=production
EXPOSE {{port}}
CMD ["npm", "start"]
